"""The fleet as teacher: candidate sets, a device's scores, and the mean that secure aggregation yields."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_lm import fleet_teacher as ft
from fl_lm import minillm as ml
from shared.secagg import quant

B, N, V, K = 3, 5, 11, 4


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(B, N, V, generator=torch.Generator().manual_seed(seed)) * 2


def test_candidates_are_the_top_k_and_always_hold_the_sampled_token() -> None:
    s = _logits(0)
    top = s.topk(K, dim=-1).indices
    tokens = top[..., 0].clone()
    tokens[0, 0] = s[0, 0].argmin()  # sampled outside the top-k
    cand = ft.candidates(s, tokens, K)
    assert cand.shape == (B, N, K)
    assert bool((cand == tokens[..., None]).any(-1).all())
    assert all(len(set(cand[b, n].tolist())) == K for b in range(B) for n in range(N))
    assert torch.equal(cand[1:], top[1:])  # where the sampled token is inside, exactly the top-k
    assert cand[0, 0, -1] == tokens[0, 0] and torch.equal(cand[0, 0, :-1], top[0, 0, :-1])
    with pytest.raises(ValueError):
        ft.candidates(s, tokens, 0)


def test_a_device_scores_candidates_and_the_rest_mass() -> None:
    d = _logits(1)
    cand = ft.candidates(_logits(0), _logits(0).argmax(-1), K)
    probs, rest = ft.score(d, cand)
    p = torch.softmax(d, -1)
    for b, n in ((0, 0), (2, 4)):
        assert probs[b, n].tolist() == pytest.approx([float(p[b, n, i]) for i in cand[b, n]], rel=1e-6)
    assert torch.allclose(probs.sum(-1) + rest, torch.ones(B, N), atol=1e-6)


def test_secure_sum_of_device_scores_gives_the_fleet_mean_within_the_quantization_bound() -> None:
    """What the aggregator learns: the sum of the devices' fixed-point vectors, never one of them.
    Summing in the ring and dividing by the count gives the mean distribution within the bound."""
    server = _logits(0)
    flat = torch.softmax(server, -1).reshape(-1, V)
    tokens = torch.multinomial(flat, 1, generator=torch.Generator().manual_seed(3)).reshape(B, N)  # some outside the top-k
    cand = ft.candidates(server, tokens, K)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[2, 3:] = False  # a rollout that ended early
    devices = [_logits(10 + i) for i in range(4)]
    vecs = [ft.to_vector(*ft.score(d, cand), mask) for d in devices]
    cfg = quant.QuantConfig(clip=1.0, n_summands=len(vecs), bits=16)
    total = np.zeros(ft.vector_len(B, N, K), dtype=np.uint64)
    for i, v in enumerate(vecs):
        total += quant.quantize(v, cfg, seed=i)
    summed = quant.dequantize_sum((total % (1 << 32)).astype(np.uint32), cfg, len(vecs))
    mean = summed / len(vecs)
    exact = np.mean(vecs, axis=0)
    assert np.abs(mean - exact).max() <= quant.error_bound(cfg, len(vecs)) / len(vecs)
    target = ft.from_mean(mean, B, N, K, mask)
    want = torch.stack([torch.softmax(d, -1) for d in devices]).mean(0)  # (B, N, V): the fleet's mean
    got = target.probs[mask]
    assert torch.allclose(got, want.gather(-1, cand)[mask], atol=1e-3)
    assert torch.allclose(target.probs.sum(-1)[mask] + target.rest[mask], torch.ones(int(mask.sum())), atol=1e-6)
    assert float(target.probs[~mask].abs().sum() + target.rest[~mask].abs().sum()) == 0.0
    lp = ft.token_logp(target, cand, tokens)
    assert torch.allclose(lp[mask], torch.log(want.gather(-1, tokens[..., None])[..., 0])[mask], atol=2e-3)
    with pytest.raises(ValueError, match="expected"):
        ft.from_mean(mean[:-1], B, N, K, mask)


def test_the_fleet_target_on_the_whole_vocabulary_is_the_mean_distribution_as_teacher() -> None:
    """With K = V the bucketed single-step term against the fleet target is exactly KL(q || mean p)."""
    student, devices = _logits(0), [_logits(20 + i) for i in range(3)]
    cand = torch.arange(V).expand(B, N, V)
    mask = torch.ones(B, N, dtype=torch.bool)
    target = ft.from_mean(np.mean([ft.to_vector(*ft.score(d, cand), mask) for d in devices], axis=0), B, N, V, mask)
    mean_p = torch.stack([torch.softmax(d, -1) for d in devices]).mean(0)
    got = ml.single_step_term_candidates(student, cand, target.probs, target.rest, mask)
    q = torch.softmax(student, -1)
    brute = (q * (torch.log(q) - torch.log(mean_p))).sum(-1).mean()
    assert float(got) == pytest.approx(float(brute), rel=1e-4, abs=1e-6)
