"""Depth pruning: a student derived from the teacher by keeping some of its decoder layers, then
recovered by distillation from it (``fl_lm.recover``). Same tokenizer, same width, so every mode
(fedkd, fl-minillm) runs on the pair without an alignment.

Which layers stay:
- ``even``: evenly spaced, always the first and the last (the baseline).
- ``importance``: ShortGPT's Block Influence, 1 - cos(input, output) of a layer's hidden states,
  averaged over the real tokens of public batches; the ``keep`` layers that change their input
  most are kept, in order. Minitron ranks depth the same way (or by the loss of dropping each
  layer, which costs one evaluation per layer: 30 here, against one pass for all of them).
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fl_lm import recover
from fl_lm.data import collate, encode_example
from shared.config import require
from shared.datasets import Example
from shared.errors import ConfigError

log = logging.getLogger(__name__)

METHODS = ("importance", "even")
# Config fields that hold one entry per layer, to be cut down with the layers (Qwen2/Gemma-style
# sliding/full attention lists; Llama has none, but a user's HF directory may be either).
PER_LAYER_CONFIG = ("layer_types",)


@dataclass(frozen=True)
class PruneSettings:
    method: str = "importance"
    keep: int | None = None  # layers to keep; or keep_fraction of them
    keep_fraction: float | None = None
    score_examples: int = 64  # public examples the importance is averaged over: ~15k tokens, a stable ranking
    score_batch_size: int = 4
    max_len: int = 256
    heldout: int = 64  # public examples set aside (never trained on) for the before/after perplexity
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        require((self.keep is None) != (self.keep_fraction is None), "give exactly one of keep and keep_fraction")
        require(self.keep is None or self.keep >= 1, f"keep must be >= 1, got {self.keep}")
        require(self.keep_fraction is None or 0.0 < self.keep_fraction <= 1.0,
                f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        require(self.score_examples >= 1 and self.score_batch_size >= 1, "score_examples and score_batch_size must be >= 1")
        require(self.heldout >= 1, f"heldout must be >= 1, got {self.heldout}")
        require(self.max_len >= 8, f"max_len must be >= 8 tokens, got {self.max_len}")

    def n_keep(self, n_layers: int) -> int:
        n = self.keep if self.keep is not None else max(1, round(float(self.keep_fraction or 0) * n_layers))
        if n > n_layers:
            raise ConfigError(f"keep {n} layers: the model has only {n_layers}")
        if self.method == "even" and n < 2 <= n_layers:
            raise ConfigError("method even keeps the first and the last layer: keep at least 2")
        return n


def even_layers(n_layers: int, keep: int) -> list[int]:
    """``keep`` evenly spaced layer indices of ``n_layers``, first and last included."""
    if keep >= n_layers:
        return list(range(n_layers))
    if keep == 1:
        return [0]
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


def top_layers(scores: list[float], keep: int) -> list[int]:
    """Indices of the ``keep`` highest scores, in layer order (ties: the earlier layer)."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:keep])


def decoder_layers(model: Any) -> Any:
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__}: no decoder layer list to prune (expected model.model.layers)")
    return layers


def block_influence(model: Any, batches: list[dict[str, Any]]) -> list[float]:
    """Per layer, 1 - cosine similarity of its input and output hidden states, averaged over real tokens.

    Read with hooks on the layers themselves, not ``output_hidden_states``: its last entry has the
    final norm applied, which would skew the last layer's score.
    """
    import torch

    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    mask: list[Any] = [None]

    def hook(i: int) -> Any:
        def fn(_mod: Any, args: tuple, kwargs: dict, output: Any) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
            h_out = output[0] if isinstance(output, tuple) else output  # (B, T, H)
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (B, T)
            sums[i] += float(((1.0 - cos) * mask[0]).sum())
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    dev = next(model.parameters()).device
    tokens = 0.0
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                mask[0] = b["attention_mask"].to(dev).float()
                tokens += float(mask[0].sum())
                model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev))
    finally:
        for h in handles:
            h.remove()
    return [s / max(1.0, tokens) for s in sums]


def keep_layers(model: Any, keep: list[int]) -> None:
    """Cut ``model`` down to the decoder layers ``keep`` (in place), config and cache indices included."""
    import torch

    layers = decoder_layers(model)
    n = len(layers)
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"layers to keep must be increasing indices in [0, {n}), got {keep}")
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(kept):
        # The KV cache is indexed by layer_idx: a kept layer 29 must now write slot 9.
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new
    model.get_decoder().layers = kept
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    for name in PER_LAYER_CONFIG:
        v = getattr(cfg, name, None)
        if isinstance(v, (list, tuple)) and len(v) == n:
            setattr(cfg, name, [v[i] for i in keep])


def split_public(examples: list[Example], heldout: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded shuffle, the held-out part never trained or scored on."""
    if len(examples) <= heldout:
        raise ConfigError(f"public data has {len(examples)} examples; holding out {heldout} for the perplexity "
                          "leaves none to score and train on (lower --heldout or give more data)")
    order = list(examples)
    random.Random(seed).shuffle(order)
    return order[heldout:], order[:heldout]


def prune(model_dir: Path, out: Path, public: list[Example], s: PruneSettings, r: recover.RecoverySettings,
          force: bool = False, teacher: Any = None) -> dict[str, Any]:
    """Write the pruned, recovered student of ``model_dir`` to ``out``; returns its model card.

    ``teacher`` is the loaded ``model_dir`` when the caller has placed it on a device already.
    """
    from fl_lm.loading import file_digest, load_model, load_tokenizer, param_count
    from fl_lm.model_dir import check_out, read_card, write_card, writing

    check_out(out, force)  # before minutes of scoring and recovery, not after
    parent_card = read_card(model_dir)
    train, held = split_public(public, s.heldout, s.seed)
    tok = load_tokenizer(str(model_dir))
    t0 = time.monotonic()
    teacher = load_model(str(model_dir)) if teacher is None else teacher
    teacher.eval()
    n_layers = len(decoder_layers(teacher))
    n = s.n_keep(n_layers)
    log.info("loaded %s (%d layers, %s parameters) in %.1fs", model_dir, n_layers, f"{param_count(teacher):,}", time.monotonic() - t0)
    scores: list[float] | None = None
    score_s = 0.0
    if s.method == "importance":
        t0 = time.monotonic()
        enc = [encode_example(tok, e, s.max_len) for e in train[: s.score_examples]]
        bs = [collate(tok, enc[i : i + s.score_batch_size]) for i in range(0, len(enc), s.score_batch_size)]
        scores = block_influence(teacher, bs)
        score_s = time.monotonic() - t0
        kept = top_layers(scores, n)
        log.info("block influence on %d public examples (%.1fs): %s", len(enc), score_s, " ".join(f"{x:.3f}" for x in scores))
    else:
        kept = even_layers(n_layers, n)
    log.info("keeping %d of %d layers (%s): %s", len(kept), n_layers, s.method, kept)

    student = copy.deepcopy(teacher)
    keep_layers(student, kept)
    h = recover.held_out(teacher, tok, held, r)
    before = recover.held_out_scores(student, h, r)
    log.info("held-out (%d examples): teacher perplexity %.2f; pruned student %.2f (KD %.3f) before recovery",
             len(held), h.teacher_ppl, before["ppl"], before["kd"])
    rec = recover.recover(student, teacher, tok, train, r, s.seed)
    after = before if r.steps == 0 else recover.held_out_scores(student, h, r)
    if r.steps:
        log.info("after %d recovery steps: held-out perplexity %.2f (KD %.3f)", r.steps, after["ppl"], after["kd"])
    rec.update(heldout_examples=len(held), teacher_ppl=h.teacher_ppl, heldout_ppl_before=before["ppl"],
               heldout_ppl_after=after["ppl"], heldout_kd_before=before["kd"], heldout_kd_after=after["kd"])

    with writing(out, force) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        base = parent_card or {}
        card = {
            "name": f"{base.get('name', model_dir.name)}-{s.method}-{len(kept)}of{n_layers}",
            "source": base.get("source", {"kind": "hf", "file": model_dir.name}),
            "licence": base.get("licence", "unknown"),
            "licence_from": f"the unpruned model's card ({base.get('licence_from')})" if base else "not stated by the source",
            "architecture": {**base.get("architecture", {}), "class": type(student).__name__,
                             "num_hidden_layers": len(kept)},
            "parameters": param_count(student),
            "dtype": str(next(student.parameters()).dtype).removeprefix("torch."),
            "chat_template": bool(getattr(tok, "chat_template", None)),
            "base_digest": file_digest(tmp),
            "parent": {"name": base.get("name", model_dir.name), "base_digest": base.get("base_digest") or file_digest(model_dir),
                       "num_hidden_layers": n_layers, "parameters": param_count(teacher)},
            "pruning": {"method": s.method, "source_layers": n_layers, "kept_layers": kept,
                        "scores": scores, "score": "block influence (ShortGPT), mean over real tokens" if scores else None,
                        "score_examples": min(s.score_examples, len(train)) if scores else 0,
                        "score_seconds": round(score_s, 1), "settings": asdict(s), "recovery": rec},
            "pruned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        card["architecture"].setdefault("hidden_size", student.config.hidden_size)
        card["architecture"].setdefault("vocab_size", student.config.vocab_size)
        write_card(tmp, card)
    log.info("wrote %s: %d layers, %s parameters", out, len(kept), f"{card['parameters']:,}")
    return card
