"""What a held-out loss has to beat before it means anything: a uniform guess and a unigram model.

The loss in the report is the mean, over the devices' families, of the cross-entropy per response
token (the same tokens and weighting as ``fl_lm.evaluate``). A uniform guess over the vocabulary
scores ln V; a unigram model fitted on the devices' training responses (add-one smoothed) knows
only which tokens are common. A student that does not beat the unigram has learned word
frequencies, not answers, whatever its percentage drop.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

from shared.datasets import Example

MAX_LEN = 128  # as the aggregator's evaluation (fl_lm.evaluate)


def _labels(tok: Any, ex: Example) -> list[int]:
    from fl_lm.data import IGNORE, encode_example

    _, labels = encode_example(tok, ex, MAX_LEN)
    return [t for t in labels[1:] if t != IGNORE]  # the first token is never predicted (shifted loss)


def loss_baselines(tok: Any, train: Iterable[Example], heldout: dict[str, list[Example]]) -> dict[str, float]:
    """{"uniform": ln V, "unigram": mean over families of the unigram cross-entropy per token, "vocab": V}."""
    vocab = len(tok)
    counts: Counter[int] = Counter()
    for ex in train:
        counts.update(_labels(tok, ex))
    total = sum(counts.values())
    per_family = []
    for exs in heldout.values():
        nll, n = 0.0, 0
        for ex in exs:
            for t in _labels(tok, ex):
                nll -= math.log((counts[t] + 1) / (total + vocab))
                n += 1
        if n:
            per_family.append(nll / n)
    return {"vocab": float(vocab), "uniform": math.log(vocab),
            "unigram": sum(per_family) / len(per_family) if per_family else float("nan")}
