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
    t = torch.from_numpy(np.clip(vec, 0.0, None).reshape(b, n, k + 1)).float().to(mask.device)  # (B, N, K+1)
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


def score_rollouts(model: Any, ids: np.ndarray, cand: np.ndarray, mask: np.ndarray, prompt_len: int) -> np.ndarray:
    """A device's side of a client-teacher round: its (locally trained) model's scoring vector.

    ids (B, P + N), cand (B, N, K), mask (B, N), from the signed round spec; returns
    ``to_vector`` of its bucket probabilities, B*N*(K+1) values in [0, 1]. Scored where the model
    was placed (``fl_lm.device``), autocast; the vector comes back to the host.
    """
    import torch

    from fl_lm.device import of_model

    pl = of_model(model)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if ids.min() < 0 or ids.max() >= vocab or cand.min() < 0 or cand.max() >= vocab:
        raise ValueError(f"rollout or candidate ids outside this model's vocabulary of {vocab}")
    n = cand.shape[1]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with pl.autocast():
                logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long, device=pl.device)).logits  # (B, P+N, V)
            resp = logits[:, prompt_len - 1 : prompt_len - 1 + n]  # (B, N, V): distribution of response token n
            probs, rest = score(resp, torch.as_tensor(cand, dtype=torch.long, device=pl.device))
    finally:
        model.train(was_training)
    return to_vector(probs, rest, torch.as_tensor(mask, dtype=torch.bool, device=pl.device))


def fleet_step(model: Any, optimizer: Any, ids: Any, prompt_len: int, cand: Any, mask: Any, target: FleetTarget,
               old_logp: Any, settings: Any, lm_batch: dict[str, Any] | None = None) -> dict[str, float]:
    """The aggregator's side: ``settings.ppo_epochs`` MiniLLM updates of ``model`` (which sampled
    the rollouts ``ids`` (B, P+N), log-probs ``old_logp`` (B, N)) towards the fleet's target.

    The single-step term is exact on the K + 1 buckets the fleet scored; the long-term term takes
    its rewards log p_fleet(y_t) - log q(y_t) from the sampled tokens, which every candidate set
    holds. Sampling was from ``model`` itself (no teacher to mix in), so the importance weight is 1.
    """
    import torch

    from fl_lm import kd
    from fl_lm import minillm as ml
    from fl_lm.device import Stepper, of_model

    s = settings
    pl = of_model(model)
    lm_batch = pl.put(lm_batch) if lm_batch is not None else None
    tokens = ids[:, prompt_len:]  # (B, N)
    with torch.no_grad():
        rewards = ml.token_rewards(token_logp(target, cand, tokens), old_logp, mask)  # (B, N)
        adv = ml.returns(rewards, mask, s.gamma, s.length_norm)
        if s.whiten:
            adv = ml.whiten(adv, mask)
    zero = torch.zeros_like(old_logp)
    params = [p for p in model.parameters() if p.requires_grad]
    step = Stepper(pl, params, optimizer, max_norm=1.0)
    model.train()
    stats: dict[str, float] = {}
    for _ in range(s.ppo_epochs):
        logits = ml.response_logits(model, ids, prompt_len)  # (B, N, V)
        single = ml.single_step_term_candidates(logits, cand, target.probs, target.rest, mask)
        pg = ml.pg_term(ml.token_logp(logits, tokens), old_logp, zero, adv, mask, s.clip)
        loss = single + pg
        lm = torch.zeros(())
        if lm_batch is not None and s.lm_coef > 0:
            with pl.autocast():
                out = model(input_ids=lm_batch["input_ids"], attention_mask=lm_batch.get("attention_mask")).logits
            lm = kd.lm_loss(out[:, :-1], lm_batch["labels"][:, 1:])
            loss = loss + s.lm_coef * lm
        optimizer.zero_grad(set_to_none=True)
        step(loss)
        stats = {"loss": float(loss.detach()), "single_step": float(single.detach()), "pg": float(pg.detach()),
                 "lm": float(lm.detach())}
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    m = mask.float()
    stats["reward"] = float(rewards.sum() / m.sum().clamp_min(1.0))
    return stats
