"""Serve a release directory with a plain ``onnxruntime.InferenceSession``: a KV-cache decode loop.

No optimum or torch at run time: this is what a device runs. The prompt goes through once
(prefill), then one token a step with the cache the model returned (``present.*`` fed back as
``past_key_values.*``). Greedy, or sampling with temperature and top-p from a seeded generator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # benchmarks: EOS is never chosen (as min_new_tokens does in generate)


def pick_providers(preferred: tuple[str, ...] | list[str]) -> list[str]:
    """The profile's execution providers in its order, those this machine has; CPU last always."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    out = [p for p in preferred if p in have and p != "CPUExecutionProvider"]
    return [*out, "CPUExecutionProvider"]


class OnnxLM:
    def __init__(self, release_dir: str | Path, providers: tuple[str, ...] | list[str] = (), threads: int = 0,
                 model_file: str = "model.onnx") -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.dir = Path(release_dir)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.providers = pick_providers(list(providers))
        self.session = ort.InferenceSession(str(self.dir / model_file), opts, providers=self.providers)
        self.tok = AutoTokenizer.from_pretrained(str(self.dir))
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        ins = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in ins if n.startswith("past_key_values.")]
        # (batch, kv heads, past length, head dim): the two fixed dims from the graph itself.
        shape = ins[self.past_names[0]].shape if self.past_names else [1, 1, 0, 1]
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.has_position_ids = "position_ids" in ins
        self.out_names = [o.name for o in self.session.get_outputs()]
        self.forward(np.array([[self.tok.eos_token_id]], dtype=np.int64))  # warm-up: first-run allocations now
        log.info("release %s loaded with %s", self.dir, self.providers)

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return {n: z for n in self.past_names}

    def forward(self, ids: np.ndarray, past: dict[str, np.ndarray] | None = None,
                attention: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """ids (B, T) -> (logits (B, T, V), the new cache). ``past`` None: start from nothing."""
        b, t = ids.shape
        past = past if past is not None else self._empty_past(b)
        p = next(iter(past.values())).shape[2] if past else 0
        feeds: dict[str, Any] = {"input_ids": ids.astype(np.int64),
                                 "attention_mask": attention if attention is not None else np.ones((b, p + t), dtype=np.int64),
                                 **past}
        if self.has_position_ids:
            feeds["position_ids"] = np.broadcast_to(np.arange(p, p + t, dtype=np.int64), (b, t)).copy()
        outs = dict(zip(self.out_names, self.session.run(None, feeds)))
        new = {n: outs[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return outs["logits"], new

    def generate_ids(self, prompt_ids: list[int], s: Sampling = Sampling()) -> list[int]:
        """New token ids after ``prompt_ids`` (stops at EOS, which is not returned)."""
        rng = np.random.default_rng(s.seed)
        logits, past = self.forward(np.array([prompt_ids or [self.tok.eos_token_id]], dtype=np.int64))
        out: list[int] = []
        for _ in range(s.max_new_tokens):
            last = logits[0, -1]
            if s.ignore_eos:
                last = last.copy()
                last[self.tok.eos_token_id] = -np.inf
            nxt = _choose(last, s, rng)
            if nxt == self.tok.eos_token_id:
                break
            out.append(nxt)
            logits, past = self.forward(np.array([[nxt]], dtype=np.int64), past)
        return out

    def generate(self, prompt: str, s: Sampling = Sampling()) -> str:
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        return str(self.tok.decode(self.generate_ids(ids, s), skip_special_tokens=True))

    def instruction_prompt(self, instruction: str, input_text: str = "") -> str:
        """An instruction as the student saw its examples in training (``fl_lm.data.prompt_text``):
        the release tokenizer's chat template where it has one, else the Alpaca template."""
        from fl_lm.data import prompt_text
        from shared.datasets import Example

        return prompt_text(self.tok, Example(instruction, input_text, ""))


def _choose(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    if s.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / max(s.temperature, 1e-6)
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), s.top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))
