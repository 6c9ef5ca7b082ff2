"""The fleet as teacher: what a device computes on the server's rollouts, and what comes back.

In a client-teacher round of ``fl-minillm`` the aggregator's student samples continuations of
public prompts and picks, per response position, a candidate set: its own top-k, with the token
it actually sampled always in it (the reward log p(y_t) needs the teacher's probability of exactly
that token). Each device scores the rollouts with its locally trained student and returns, per
position, its probabilities on the K candidates and the mass it puts everywhere else: one dense
vector of prompts x positions x (K + 1) values in [0, 1]. That vector goes through secure
aggregation like an update, so the aggregator only ever sees the fleet's sum; divided by the
number of contributors it is the fleet's mean next-token distribution on the K + 1 buckets, which
is what ``fl_lm.minillm.single_step_term_candidates`` and the rewards consume.

Shapes: B rollouts, N response positions, K candidates, V vocabulary. Positions past a rollout's
end (mask False) are zeros on the wire and ignored after.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

_FLOOR = 1e-12


class FleetTarget(NamedTuple):
    """The fleet's mean distribution on the candidate buckets."""

    probs: Any  # (B, N, K) float: mean probability of each candidate
    rest: Any  # (B, N) float: mean mass outside the candidates


def candidates(student_logits: Any, tokens: Any, k: int) -> Any:
    """(B, N, V) logits of the server's student, (B, N) sampled tokens -> (B, N, K) distinct ids.

    The student's top-k, except that a sampled token outside it takes the k-th slot: the reward
    at that position is the teacher's log-probability of the sampled token, so it must be scored.
    """
    import torch

    if not 1 <= k <= student_logits.size(-1):
        raise ValueError(f"candidate count k must be in [1, {student_logits.size(-1)}], got {k}")
    top = student_logits.topk(k, dim=-1).indices  # (B, N, K)
    inside = (top == tokens[..., None]).any(-1)  # (B, N)
    last = torch.where(inside, top[..., -1], tokens)  # (B, N)
    return torch.cat([top[..., :-1], last[..., None]], dim=-1)


def score(logits: Any, cand_ids: Any) -> tuple[Any, Any]:
    """A device's (B, N, V) logits on the rollouts -> its probabilities on the candidates
    (B, N, K) and the rest mass (B, N), both in [0, 1] and summing to 1 per position."""
    import torch

    p = torch.softmax(logits.float(), dim=-1)  # (B, N, V)
    on = p.gather(-1, cand_ids)  # (B, N, K)
    rest = (1.0 - on.sum(-1)).clamp(0.0, 1.0)  # (B, N)
    return on, rest


def to_vector(probs: Any, rest: Any, mask: Any) -> np.ndarray:
    """(B, N, K), (B, N), (B, N) bool -> float64 vector of B*N*(K+1), zeros where masked out."""
    import torch

    v = torch.cat([probs.float(), rest.float()[..., None]], dim=-1) * mask.float()[..., None]  # (B, N, K+1)
    return v.detach().cpu().numpy().astype(np.float64).reshape(-1)


def vector_len(b: int, n: int, k: int) -> int:
    return b * n * (k + 1)


def from_mean(vec: np.ndarray, b: int, n: int, k: int, mask: Any) -> FleetTarget:
    """The contributors' mean vector (sum / count, after secure aggregation) -> FleetTarget.

    Fixed-point rounding leaves each bucket off by at most the quantization step, so buckets are
    clamped at zero and each position renormalised to sum to 1; positions outside ``mask`` (B, N)
    (the aggregator made the rollouts, so it knows where they end) are zeroed, not renormalised noise.
    """
    import torch

    if vec.shape != (vector_len(b, n, k),):
        raise ValueError(f"fleet vector has {vec.shape[0] if vec.ndim == 1 else vec.shape} values, "
                         f"expected {vector_len(b, n, k)} = {b} x {n} x ({k} + 1)")
    t = torch.from_numpy(np.clip(vec, 0.0, None).reshape(b, n, k + 1)).float()  # (B, N, K+1)
    t = t * mask.float()[..., None]
    total = t.sum(-1, keepdim=True)  # (B, N, 1)
    t = torch.where(total > 0, t / total.clamp_min(_FLOOR), t)
    return FleetTarget(probs=t[..., :k], rest=t[..., k])


def token_logp(target: FleetTarget, cand_ids: Any, tokens: Any) -> Any:
    """log p_fleet(y_t) of the sampled tokens (which ``candidates`` put in every set): (B, N)."""
    import torch

    hit = cand_ids == tokens[..., None]  # (B, N, K)
    p = (target.probs * hit.float()).sum(-1)  # (B, N)
    return torch.log(p.clamp_min(_FLOOR))
