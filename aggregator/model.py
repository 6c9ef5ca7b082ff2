"""A model the aggregator hosts: base by id or path, its own LoRA adapter, evaluation, checkpoints.

The student (whose adapter the fleet trains) and the teacher (the larger model that only the
aggregator runs) are both a ``HostedModel``; each is checkpointed in PEFT's own format under its
own directory, so either loads back with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared import messages as M
from shared.datasets import Example

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FamilyEval:
    n: int
    loss: float
    exact_match: float | None


@dataclass(frozen=True)
class EvalSummary:
    """Held-out scores of one model on one set of families."""

    families: dict[str, FamilyEval]
    mean_loss: float
    mean_exact_match: float | None

    def to_json(self) -> dict[str, Any]:
        return {"eval": {f: {"n": s.n, "loss": s.loss, "exact_match": s.exact_match} for f, s in self.families.items()},
                "mean_loss": self.mean_loss, "mean_exact_match": self.mean_exact_match}

    @staticmethod
    def from_json(d: dict[str, Any]) -> EvalSummary:
        fams = {f: FamilyEval(int(s["n"]), float(s["loss"]), s["exact_match"]) for f, s in d["eval"].items()}
        return EvalSummary(fams, float(d["mean_loss"]), d["mean_exact_match"])


class HostedModel:
    """Tokenizer + base + PEFT LoRA; ``state`` is the adapter as float32 numpy arrays.

    On the ``placement``'s device (``fl_lm.device``; by default ``resolve("auto")``): weights and
    adapter stay float32 there (the release merges them, and the base digest is the devices'),
    and the loops that run the model (evaluation, distillation) autocast its forward passes.
    """

    def __init__(self, name: str, id_or_path: str, lora: M.LoraSpec, *, seed: int, max_seq_len: int, eval_batch_size: int,
                 placement: Any = None) -> None:
        from fl_lm import device
        from fl_lm.loading import base_digest, check_model_source, load_model, load_tokenizer, param_count
        from fl_lm.lora import attach_lora, get_adapter

        check_model_source(id_or_path, name)  # one line naming what is wrong, not a hub error
        self.name = name
        self.id_or_path = id_or_path
        self.placement = placement or device.resolve("auto")
        self.tok = load_tokenizer(id_or_path)
        base = load_model(id_or_path)
        self.params = param_count(base)
        self.digest = base_digest(base, id_or_path)
        self.lora = lora
        self.peft = device.place(attach_lora(base, lora, seed=seed), self.placement)
        self.state: dict[str, np.ndarray] = get_adapter(self.peft)
        self.max_seq_len = max_seq_len
        self.eval_batch_size = eval_batch_size
        log.info("%s %s: %d params, digest %s, on %s", name, id_or_path, self.params, self.digest[:12],
                 self.placement.describe())

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        from fl_lm.lora import set_adapter

        set_adapter(self.peft, state)
        self.state = {k: np.array(v, np.float32, copy=True) for k, v in state.items()}

    def pull_state(self) -> dict[str, np.ndarray]:
        """Read the adapter back after training it in place."""
        from fl_lm.lora import get_adapter

        self.state = get_adapter(self.peft)
        return self.state

    def evaluate(self, examples: list[Example]) -> EvalSummary:
        from fl_lm.evaluate import evaluate, mean_exact_match, mean_loss

        scores = evaluate(self.peft, self.tok, examples, self.max_seq_len, self.eval_batch_size)
        fams = {f: FamilyEval(s.n, s.loss, s.exact_match) for f, s in scores.items()}
        return EvalSummary(fams, mean_loss(scores), mean_exact_match(scores))

    def answers(self, examples: list[Example]) -> list[str]:
        from fl_lm.evaluate import answers

        self.peft.eval()
        return answers(self.peft, self.tok, examples, self.max_seq_len)

    def save(self, directory: Path) -> None:
        from fl_lm.lora import save

        save(self.peft, directory)

    def load(self, directory: str | Path) -> None:
        from aggregator.checkpoint import load_adapter

        self.set_state(load_adapter(directory))
