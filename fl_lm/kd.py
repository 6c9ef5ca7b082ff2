"""Token-level knowledge-distillation losses on teacher distributions, masked to response tokens.

Positions are *target* positions: ``logits[:, t]`` is the distribution over the token at ``t+1``
and ``labels[:, t]`` that token (callers pass ``logits[:, :-1]`` and ``labels[:, 1:]``), and only
positions whose label is not ``IGNORE`` count.

A teacher distribution travels as a ``Target``: per position, K vocabulary ids of the *student*
with the teacher's log-probabilities on them, the rest of the teacher's mass being one more
bucket. That covers top-k truncation (K ids, the remainder as a bucket), a distribution mapped
from another tokenizer (K mapped ids, nothing left over) and a one-hot fallback (one id, the
rest invalid). Both sides are collapsed onto the same K+1 buckets and the divergence comes from
TRL's generalized JSD (``GKDTrainer.generalized_jsd_loss``): beta 0 is forward KL(p||q), beta 1
reverse KL(q||p), in between the generalized JSD of Agarwal et al. (GKD). With K = V the buckets
are the vocabulary and the loss is the exact full-vocabulary divergence.

Mixed with the language-modelling loss as in FedMKT: ``kd_alpha * LM + (1 - kd_alpha) * KD``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from fl_lm.data import IGNORE

KINDS = ("forward_kl", "reverse_kl", "jsd")
NEG = -1e4  # log-probability of an empty bucket: exp() is exactly 0 in float32, and finite
_REST_FLOOR = 1e-12  # the rest bucket never goes to log(0), which would make the KL terms NaN


@dataclass(frozen=True)
class Target:
    """A teacher distribution per target position, on the student's vocabulary."""

    idx: Any  # (B, T, K) long: student vocabulary ids
    logp: Any  # (B, T, K) float: teacher log-probabilities on them; NEG where the slot is empty

    def valid(self) -> Any:
        return self.logp > NEG / 2  # (B, T, K) bool


def beta_of(kind: str, beta: float = 0.5) -> float:
    if kind == "forward_kl":
        return 0.0
    if kind == "reverse_kl":
        return 1.0
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs beta in (0, 1), got {beta}")
        return beta
    raise ValueError(f"kd loss must be one of {KINDS}, got {kind!r}")


def topk_target(teacher_logits: Any, k: int, temperature: float = 1.0) -> Target:
    """The teacher's own top-k (same tokenizer as the student); k = 0 or >= V keeps everything."""
    import torch

    lp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, T, V)
    if k <= 0 or k >= lp.size(-1):
        idx = torch.arange(lp.size(-1), device=lp.device).expand_as(lp)
        return Target(idx=idx, logp=lp)
    val, idx = lp.topk(k, dim=-1)  # (B, T, K)
    return Target(idx=idx, logp=val)


def detach(t: Target) -> Target:
    return Target(idx=t.idx, logp=t.logp.detach())


def buckets(student_logits: Any, target: Target, temperature: float = 1.0) -> tuple[Any, Any]:
    """Student and teacher log-probabilities on the K target ids plus one rest bucket: (B, T, K+1) each."""
    import torch

    valid = target.valid()  # (B, T, K)
    s_all = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    s = s_all.gather(-1, target.idx).masked_fill(~valid, NEG)  # (B, T, K)
    t = target.logp.float().masked_fill(~valid, NEG)  # (B, T, K)

    def with_rest(x: Any) -> Any:
        inside = torch.exp(x).sum(-1, keepdim=True)  # (B, T, 1)
        rest = torch.log((1.0 - inside).clamp_min(_REST_FLOOR))  # (B, T, 1)
        return torch.cat([x, rest], dim=-1)  # (B, T, K+1)

    return with_rest(s), with_rest(t)


def _trl_jsd() -> Any:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


def token_divergence(student_logits: Any, target: Target, kind: str = "forward_kl", beta: float = 0.5,
                     temperature: float = 1.0) -> Any:
    """Per-position divergence between the teacher target and the student: (B, T)."""
    s, t = buckets(student_logits, target, temperature)  # (B, T, K+1) each
    b = beta_of(kind, beta)
    # Bucketed log-probs are already normalized: TRL's own log_softmax at temperature 1 keeps them.
    per = _trl_jsd()(s, t, labels=None, beta=b, temperature=1.0, reduction="none")  # (B, T, K+1)
    return per.sum(-1)  # (B, T)


def response_mask(labels: Any) -> Any:
    return labels != IGNORE  # (B, T)


def kd_loss(student_logits: Any, target: Target, labels: Any, kind: str = "forward_kl", beta: float = 0.5,
            temperature: float = 1.0, sample_weight: Any = None) -> Any:
    """Mean divergence over response tokens (of samples with weight > 0, weighted)."""
    div = token_divergence(student_logits, target, kind, beta, temperature)  # (B, T)
    w = response_mask(labels).float()  # (B, T)
    if sample_weight is not None:
        w = w * sample_weight.float()[:, None]
    return (div * w).sum() / w.sum().clamp_min(1.0)


def sample_ce(logits: Any, labels: Any) -> Any:
    """Mean cross-entropy of each sample's response tokens against its reference: (B,)."""
    import torch

    ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels.clamp_min(0), reduction="none")  # (B, T)
    m = response_mask(labels).float()
    return (ce * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def lm_loss(logits: Any, labels: Any) -> Any:
    """Token-mean cross-entropy over all response tokens of the batch (what HF's loss is)."""
    import torch

    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE)


def select_other(ce_self: Any, ce_other: Any) -> Any:
    """FedMKT's DualMinCE ("greater"): learn from the other model only where it fits the reference
    better, i.e. has the lower cross-entropy on that sample. (B,) bool."""
    return ce_other < ce_self


def mixed(lm: Any, kd: Any, kd_alpha: float) -> Any:
    return kd_alpha * lm + (1.0 - kd_alpha) * kd
