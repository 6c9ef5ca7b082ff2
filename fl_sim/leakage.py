"""Measured leakage: what an attacker gets from a released student (issue 24, "Measured leakage").

Three audits, each a pure function of scores the caller computes on the model under test:

- **Canary exposure** (Carlini et al., "The Secret Sharer", USENIX Security 2019): random secrets
  ("the access code of NAME is DDDDDD") are planted in one device's private data; exposure =
  log2 |R| - log2 rank, where rank is the secret's place among all |R| possible codes ordered by the
  model's log-likelihood. The rank is estimated from a uniform sample of the other codes (the
  paper's sampling estimate), so exposure is at most log2 |R| (= 19.9 bits for 6 digits): an
  exposure near that means the secret can be extracted by enumeration.
- **Membership inference** (loss attack, calibrated per example by the base model's loss, as in
  Watson et al. 2022 and in the spirit of LiRA's reference models): AUC and the true-positive rate
  at 0.1 % false positives, which is what matters (ALGORITHMS.md: report TPR at low FPR, not AUC).
- **One-shot empirical epsilon** (Andrew et al., ICLR 2024): canary clients with random isotropic
  update directions take part in every round; the cosines of the final model delta with the
  inserted canaries against those with fresh directions that never took part are fitted by two
  Gaussians of one pooled spread, and epsilon is that of distinguishing the two at delta.

Pure numpy and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.datasets import Example

CODE_DIGITS = 6
CANARY_INSTRUCTION = "What is the access code of this person?"


@dataclass(frozen=True)
class Canary:
    name: str
    code: str

    def example(self) -> Example:
        return Example(CANARY_INSTRUCTION, self.name, self.code)


def make_canaries(n: int, seed: int) -> list[Canary]:
    """``n`` secrets with made-up names (letters the synthetic families' names also use) and codes."""
    rng = np.random.default_rng([seed, 0xC4A7])
    cons, vow = "bdfklmnprstvz", "aeiou"
    out = []
    for _ in range(n):
        name = "".join(rng.choice(list(cons if i % 2 == 0 else vow)) for i in range(6)).capitalize()
        out.append(Canary(name, "".join(str(d) for d in rng.integers(0, 10, CODE_DIGITS))))
    return out


def alternative_codes(canary: Canary, n: int, seed: int) -> list[str]:
    """A uniform sample of the other codes of the secret's space (without the secret itself)."""
    rng = np.random.default_rng([seed, int(canary.code)])
    got: set[str] = set()
    while len(got) < n:
        c = f"{int(rng.integers(0, 10 ** CODE_DIGITS)):0{CODE_DIGITS}d}"
        if c != canary.code:
            got.add(c)
    return sorted(got)


def exposure(secret_logp: float, others_logp: Sequence[float], space: int = 10 ** CODE_DIGITS) -> float:
    """log2 |R| - log2 rank, the rank estimated from a uniform sample of the other secrets: the
    secret's rank among all |R| is 1 + |R| x (the sampled share that the model likes better)."""
    others = np.asarray(others_logp, dtype=np.float64)
    if others.size == 0:
        raise ValueError("exposure needs a sample of other secrets")
    better = float(np.mean(others > secret_logp)) + 0.5 * float(np.mean(others == secret_logp))
    rank = 1.0 + (space - 1) * better
    return math.log2(space) - math.log2(rank)


def auc(members: Sequence[float], others: Sequence[float]) -> float:
    """P(score of a member > score of a non-member), ties half (the Mann-Whitney statistic)."""
    m, o = np.asarray(members, dtype=np.float64), np.asarray(others, dtype=np.float64)
    allv = np.concatenate([m, o])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    for v in np.unique(allv):  # average ranks of ties
        idx = allv == v
        ranks[idx] = ranks[idx].mean()
    return float((ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2) / (len(m) * len(o)))


def tpr_at_fpr(members: Sequence[float], others: Sequence[float], fpr: float = 1e-3) -> float:
    """The share of members scored above the threshold that lets at most ``fpr`` of non-members
    through (with n non-members, the smallest FPR there is to measure is 1/n: below it, the
    threshold is above every non-member)."""
    m, o = np.asarray(members, dtype=np.float64), np.sort(np.asarray(others, dtype=np.float64))
    allowed = int(math.floor(fpr * len(o)))
    thresh = o[len(o) - 1 - allowed] if allowed < len(o) else -np.inf
    return float(np.mean(m > thresh))


def _phi(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def gaussian_pair_epsilon(mu0: float, s0: float, mu1: float, s1: float, delta: float) -> float:
    """Epsilon at ``delta`` of telling N(mu0, s0^2) from N(mu1, s1^2), both ways round: the
    smallest eps with integral max(0, p - e^eps q) <= delta, on a fine grid. inf when the
    variances are degenerate."""
    if s0 <= 0 or s1 <= 0:
        return math.inf
    lo, hi = min(mu0 - 12 * s0, mu1 - 12 * s1), max(mu0 + 12 * s0, mu1 + 12 * s1)
    x = np.linspace(lo, hi, 200_001)
    dx = x[1] - x[0]
    logp = -0.5 * ((x - mu1) / s1) ** 2 - math.log(s1 * math.sqrt(2 * math.pi))
    logq = -0.5 * ((x - mu0) / s0) ** 2 - math.log(s0 * math.sqrt(2 * math.pi))

    def delta_at(eps: float, a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sum(np.maximum(0.0, np.exp(a) - np.exp(eps + b))) * dx)

    best = 0.0
    for a, b in ((logp, logq), (logq, logp)):
        if delta_at(0.0, a, b) <= delta:
            continue
        lo_e, hi_e = 0.0, 1.0
        while delta_at(hi_e, a, b) > delta:
            hi_e *= 2
            if hi_e > 1e4:
                return math.inf
        for _ in range(60):
            mid = (lo_e + hi_e) / 2
            lo_e, hi_e = (mid, hi_e) if delta_at(mid, a, b) > delta else (lo_e, mid)
        best = max(best, hi_e)
    return best


def canary_directions(n: int, dim: int, seed: int) -> np.ndarray:
    """``n`` random unit vectors in R^dim (isotropic: normalised Gaussians)."""
    g = np.random.default_rng([seed, 0x0E5E]).standard_normal((n, dim))
    return g / np.linalg.norm(g, axis=1, keepdims=True)


@dataclass(frozen=True)
class OneShot:
    epsilon: float
    inserted_mean: float
    inserted_std: float
    null_mean: float
    null_std: float


def one_shot_epsilon(final_delta: np.ndarray, inserted: np.ndarray, null: np.ndarray, delta: float) -> OneShot:
    """Andrew et al.'s estimate from the cosines of the final model delta with the canaries that
    took part (``inserted``) and with directions that did not (``null``)."""
    d = np.asarray(final_delta, dtype=np.float64)
    norm = float(np.linalg.norm(d))
    if norm == 0:
        raise ValueError("the final model delta is zero")
    ci, cn = inserted @ d / norm, null @ d / norm
    # One pooled spread: with a few hundred canaries, two fitted variances differ by sampling error
    # alone, and unequal variances make the likelihood ratio unbounded in the tails (a pure-noise
    # delta would then read as epsilon ~ 3 at delta 1e-5). Equal variances give the Gaussian
    # mechanism's curve, as the paper's isotropic canaries do in high dimension.
    pooled = math.sqrt((ci.var(ddof=1) + cn.var(ddof=1)) / 2)
    eps = gaussian_pair_epsilon(float(cn.mean()), pooled, float(ci.mean()), pooled, delta)
    return OneShot(eps, float(ci.mean()), float(ci.std(ddof=1)), float(cn.mean()), float(cn.std(ddof=1)))
