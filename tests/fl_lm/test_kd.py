"""The token-level KD losses: zero at equality, equal to a brute-force sum, lowered by a step."""

from __future__ import annotations

import math

import pytest
import torch

from fl_lm import kd
from fl_lm.data import IGNORE

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


def _logits(seed: int, shape=(2, 3, 7)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def _labels() -> torch.Tensor:
    return torch.tensor([[IGNORE, 2, 4], [1, IGNORE, 6]])  # one prompt position masked per row


def _brute(p: list[float], q: list[float], kind: str, beta: float) -> float:
    """The divergence of two categorical distributions, written out term by term."""
    def kl(a: list[float], b: list[float]) -> float:
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("top_k", [0, 3])
def test_zero_when_student_equals_teacher(kind: str, beta: float, top_k: int) -> None:
    t = _logits(0)
    loss = kd.kd_loss(t.clone(), kd.topk_target(t, top_k, temperature=2.0), _labels(), kind, beta, temperature=2.0)
    assert abs(float(loss)) < 1e-6


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("top_k", [0, 3])
def test_matches_brute_force(kind: str, beta: float, top_k: int) -> None:
    s, t, labels, temp = _logits(1), _logits(2), _labels(), 1.5
    got = float(kd.kd_loss(s, kd.topk_target(t, top_k, temp), labels, kind, beta, temp))
    terms = []
    for b in range(2):
        for pos in range(3):
            if labels[b, pos] == IGNORE:
                continue
            p = torch.softmax(t[b, pos] / temp, -1).tolist()
            q = torch.softmax(s[b, pos] / temp, -1).tolist()
            if top_k:  # the teacher's top k ids as they are, everything else one bucket on both sides
                keep = sorted(range(7), key=lambda i: -p[i])[:top_k]
                p = [p[i] for i in keep] + [1 - sum(p[i] for i in keep)]
                q = [q[i] for i in keep] + [1 - sum(q[i] for i in keep)]
            terms.append(_brute(p, q, kind, beta))
    assert got == pytest.approx(sum(terms) / len(terms), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_one_gradient_step_lowers_it(kind: str, beta: float) -> None:
    t = _logits(3)
    target = kd.topk_target(t, 4)
    s = torch.nn.Parameter(_logits(4))
    before = kd.kd_loss(s, target, _labels(), kind, beta)
    before.backward()
    with torch.no_grad():
        s -= 0.5 * s.grad
    after = kd.kd_loss(s, target, _labels(), kind, beta)
    assert float(after.detach()) < float(before.detach())


def test_sample_weight_and_mask_select_what_counts() -> None:
    s, t, labels = _logits(5), _logits(6), _labels()
    per = kd.token_divergence(s, kd.topk_target(t, 0))  # (B, T)
    only_first = kd.kd_loss(s, kd.topk_target(t, 0), labels, sample_weight=torch.tensor([1.0, 0.0]))
    assert float(only_first) == pytest.approx(float(per[0, 1:].mean()), rel=1e-5)


def test_lm_mixing_and_sample_ce() -> None:
    logits, labels = _logits(7), _labels()
    ce = kd.sample_ce(logits, labels)
    lp = torch.log_softmax(logits, -1)
    want0 = -(lp[0, 1, 2] + lp[0, 2, 4]) / 2
    assert float(ce[0]) == pytest.approx(float(want0), rel=1e-5)
    assert float(kd.mixed(torch.tensor(2.0), torch.tensor(4.0), 0.25)) == pytest.approx(3.5)


def test_dualmince_picks_the_lower_ce_side_per_sample() -> None:
    ce_self = torch.tensor([1.0, 2.0, 3.0, 0.5])
    ce_other = torch.tensor([0.5, 2.5, 1.0, 0.5])
    assert kd.select_other(ce_self, ce_other).tolist() == [True, False, True, False]  # ties stay with self


def test_bad_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="kd loss must be one of"):
        kd.beta_of("kl")
