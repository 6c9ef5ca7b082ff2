"""Held-out evaluation per task family: response-token loss and greedy exact match.

Runs where the model was placed (``fl_lm.device``): batches go to its device and forward passes
(generation too) are autocast at its dtype; the loss is taken in float32.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from fl_lm.data import IGNORE, collate, encode_example, prompt_text
from shared.datasets import Example

# Exact match is only meaningful for short answers; longer references report loss only.
SHORT_ANSWER_TOKENS = 24


@dataclass(frozen=True)
class FamilyScore:
    n: int
    loss: float
    exact_match: float | None  # None when no example in the family has a short answer


def evaluate(model: Any, tok: Any, examples: list[Example], max_len: int = 128, batch_size: int = 32) -> dict[str, FamilyScore]:
    import torch

    from fl_lm.device import of_model

    pl = of_model(model)
    by_fam: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_fam[e.family].append(e)
    model.eval()
    out: dict[str, FamilyScore] = {}
    with torch.no_grad():
        for fam, exs in sorted(by_fam.items()):
            tot_loss, tot_tok = 0.0, 0
            for i in range(0, len(exs), batch_size):
                batch = pl.put(collate(tok, [encode_example(tok, e, max_len) for e in exs[i : i + batch_size]]))
                with pl.autocast():
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
                logits = logits.float()
                labels = batch["labels"][:, 1:]  # (B, T-1)
                lp = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
                )
                tot_loss += float(lp)
                tot_tok += int((labels != IGNORE).sum())
            out[fam] = FamilyScore(n=len(exs), loss=tot_loss / max(1, tot_tok), exact_match=_exact_match(model, tok, exs, max_len, batch_size))
    return out


def _exact_match(model: Any, tok: Any, exs: list[Example], max_len: int, batch_size: int) -> float | None:
    from fl_lm.device import of_model

    pl = of_model(model)
    short = [e for e in exs if e.prompt and len(tok(e.output, add_special_tokens=False)["input_ids"]) <= SHORT_ANSWER_TOKENS]
    if not short:
        return None
    hits = 0
    old_side = tok.padding_side
    tok.padding_side = "left"  # generation continues from the right edge of every row
    try:
        for i in range(0, len(short), batch_size):
            chunk = short[i : i + batch_size]
            enc = tok([prompt_text(tok, e) for e in chunk], return_tensors="pt", padding=True, truncation=True, max_length=max_len, add_special_tokens=False)
            want = max(len(tok(e.output, add_special_tokens=False)["input_ids"]) for e in chunk) + 2
            with pl.autocast():
                gen = model.generate(
                    **pl.put(dict(enc)), max_new_tokens=want, do_sample=False, pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id
                )
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :].cpu(), skip_special_tokens=True)
            hits += sum(t.strip() == e.output.strip() for t, e in zip(texts, chunk))
    finally:
        tok.padding_side = old_side
    return hits / len(short)


def answers(model: Any, tok: Any, exs: list[Example], max_len: int = 128, max_new_tokens: int = 48) -> list[str]:
    """The model's greedy answer to each example's prompt (for a person to read beside the reference)."""
    import torch

    from fl_lm.device import of_model

    pl = of_model(model)
    out = []
    with torch.no_grad():
        for e in exs:
            enc = tok([prompt_text(tok, e) or " "], return_tensors="pt", truncation=True, max_length=max_len, add_special_tokens=False)
            with pl.autocast():
                gen = model.generate(**pl.put(dict(enc)), max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out.append(tok.decode(gen[0, enc["input_ids"].shape[1] :].cpu(), skip_special_tokens=True).strip())
    return out


def mean_loss(scores: dict[str, FamilyScore]) -> float:
    vals = [s.loss for s in scores.values()]
    return sum(vals) / len(vals) if vals else math.nan


def mean_exact_match(scores: dict[str, FamilyScore]) -> float | None:
    vals = [s.exact_match for s in scores.values() if s.exact_match is not None]
    return sum(vals) / len(vals) if vals else None
