"""The leakage estimators of benchmarks/privacy_audit.py (fl_sim.leakage) against known answers."""

from __future__ import annotations

import math

import numpy as np

from fl_sim import leakage


def _analytic_delta(eps: float, mu: float) -> float:
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)


def test_two_gaussians_give_the_gaussian_mechanisms_epsilon() -> None:
    """N(0, 1) against N(mu, 1) is the Gaussian mechanism of noise multiplier 1/mu: its exact
    (eps, delta) curve is Balle and Wang's (2018)."""
    for mu in (0.5, 1.0, 2.0):
        eps = leakage.gaussian_pair_epsilon(0.0, 1.0, mu, 1.0, 1e-5)
        assert abs(_analytic_delta(eps, mu) - 1e-5) < 2e-7, (mu, eps)
    assert leakage.gaussian_pair_epsilon(0.0, 1.0, 0.0, 1.0, 1e-5) == 0.0  # the same distribution
    assert leakage.gaussian_pair_epsilon(0.0, 1.0, 1.0, 0.0, 1e-5) == math.inf


def test_exposure_of_a_secret_the_model_prefers_and_of_one_it_does_not() -> None:
    others = np.linspace(-30, -10, 1000)
    assert leakage.exposure(0.0, others) == math.log2(10 ** 6)  # better than every sampled code: fully exposed
    assert leakage.exposure(-20.0, others) < 1.1  # the middle of the pack: about one bit
    assert leakage.exposure(-40.0, others) < 1e-5  # the worst: rank |R|


def test_auc_and_tpr_at_low_fpr() -> None:
    rng = np.random.default_rng(0)
    members, others = rng.normal(1.0, 1.0, 2000), rng.normal(0.0, 1.0, 2000)
    assert abs(leakage.auc(members, others) - 0.76) < 0.03  # Phi(1 / sqrt 2) = 0.760
    assert leakage.auc(others, others) == 0.5
    assert 0.0 < leakage.tpr_at_fpr(members, others, 1e-3) < 0.1
    assert leakage.tpr_at_fpr(members + 100, others, 1e-3) == 1.0


def test_one_shot_epsilon_separates_inserted_canaries_only_when_they_are_in_the_delta() -> None:
    dim, k = 20000, 100
    ins, null = leakage.canary_directions(k, dim, 1), leakage.canary_directions(k, dim, 2)
    noise = np.random.default_rng(3).standard_normal(dim) / math.sqrt(dim)  # unit norm
    without = leakage.one_shot_epsilon(noise, ins, null, 1e-5)
    with_ = leakage.one_shot_epsilon(noise + ins.sum(0) / math.sqrt(k), ins, null, 1e-5)
    assert with_.inserted_mean > 5 * with_.null_std and with_.epsilon > 5
    assert without.epsilon < 1.5 and without.epsilon < with_.epsilon / 4


def test_canaries_are_reproducible_and_their_alternatives_exclude_the_secret() -> None:
    a, b = leakage.make_canaries(4, 0), leakage.make_canaries(4, 0)
    assert a == b and len({c.code for c in a}) == 4
    alts = leakage.alternative_codes(a[0], 500, 0)
    assert len(alts) == 500 and a[0].code not in alts and all(len(c) == leakage.CODE_DIGITS for c in alts)
