"""Fixed point into Z_2^32: headroom from n, stochastic rounding, the stated error bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ConfigError
from shared.secagg import quant
from shared.secagg.quant import QuantConfig


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100, 1000, 4096, 2**20])
def test_headroom_holds_the_sum_of_n_extremes(n: int) -> None:
    cfg = QuantConfig(clip=1.0, n_summands=n)
    assert n * cfg.levels <= 2**32 - 1
    bits = quant.max_bits(n)
    assert n * (2**bits - 1) <= 2**32 - 1 < n * (2 ** (bits + 1) - 1)
    QuantConfig(clip=1.0, n_summands=n, bits=bits)  # the largest that fits is accepted


def test_bits_that_cannot_fit_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="bits"):
        QuantConfig(clip=1.0, n_summands=1000, bits=24)


@pytest.mark.parametrize("kwargs", [dict(clip=0.0, n_summands=2), dict(clip=float("inf"), n_summands=2),
                                    dict(clip=1.0, n_summands=0), dict(clip=1.0, n_summands=2, bits=0),
                                    dict(clip=1.0, n_summands=2, bits=33)])
def test_invalid_config_raises(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        QuantConfig(**kwargs)


def test_extremes_sum_without_wrapping() -> None:
    n = 1000
    cfg = QuantConfig(clip=0.5, n_summands=n)
    top = quant.quantize(np.full(8, 10.0), cfg, seed=0)  # clipped to +c -> L
    assert int(top.max()) == cfg.levels
    total = np.zeros(8, dtype=np.uint32)
    for _ in range(n):
        total += top
    np.testing.assert_allclose(quant.dequantize_sum(total, cfg, n), n * 0.5, rtol=0, atol=quant.error_bound(cfg, n))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 50), clip=st.floats(1e-3, 100.0), bits=st.one_of(st.none(), st.integers(2, 24)),
       seed=st.integers(0, 2**32 - 1))
def test_sum_within_stated_bound(n: int, clip: float, bits: int | None, seed: int) -> None:
    if bits is not None and n * (2**bits - 1) > 2**32 - 1:
        bits = quant.max_bits(n)
    cfg = QuantConfig(clip=clip, n_summands=n, bits=bits)
    rng = np.random.default_rng(seed)
    xs = rng.uniform(-1.5 * clip, 1.5 * clip, size=(n, 64))
    total = np.zeros(64, dtype=np.uint32)
    for i, x in enumerate(xs):
        total += quant.quantize(x, cfg, seed=seed + i)
    err = np.abs(quant.dequantize_sum(total, cfg, n) - np.clip(xs, -clip, clip).sum(axis=0))
    assert err.max() <= quant.error_bound(cfg, n)


def test_stochastic_rounding_is_seeded_and_unbiased() -> None:
    cfg = QuantConfig(clip=1.0, n_summands=1, bits=4)  # coarse: 15 levels, step 2/15
    x = np.full(200_000, 0.05)
    a = quant.quantize(x, cfg, seed=3)
    assert np.array_equal(a, quant.quantize(x, cfg, seed=3))
    assert not np.array_equal(a, quant.quantize(x, cfg, seed=4))
    assert abs(a.mean() / cfg.scale - cfg.clip - 0.05) < 1e-3  # floor would give a bias of ~0.017


def test_dequantize_rejects_more_summands_than_headroom() -> None:
    with pytest.raises(ConfigError):
        quant.dequantize_sum(np.zeros(2, dtype=np.uint32), QuantConfig(clip=1.0, n_summands=3), 4)
