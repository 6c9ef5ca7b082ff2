from __future__ import annotations

import numpy as np
import pytest

from shared import messages as M
from shared import sparse, update_codec
from shared.errors import ConfigError, SchemaError


def _sp(method: str, dim: int = 100, k: int = 10, seed: int = 1) -> M.SparseSpec:
    idx = b""
    if method in ("random", "topk"):
        idx = sparse.encode_indices(sparse.random_k(dim, k, seed), dim)
    return M.SparseSpec(method=method, dim=dim, k=dim if method == "dense" else k, seed=seed, indices=idx,  # type: ignore[arg-type]
                        value_dtype="float32")


def test_round_indices_by_method() -> None:
    np.testing.assert_array_equal(update_codec.round_indices(_sp("dense")), np.arange(100))
    np.testing.assert_array_equal(update_codec.round_indices(_sp("random")), sparse.random_k(100, 10, 1))
    assert update_codec.round_indices(_sp("device_topk")) is None
    bad = M.SparseSpec(method="topk", dim=100, k=11, seed=1, indices=sparse.encode_indices(np.arange(10, dtype=np.uint32), 100),
                       value_dtype="float32")
    with pytest.raises(SchemaError):
        update_codec.round_indices(bad)


@pytest.mark.parametrize(("n", "ring"), [(1, 32), (3, 32), (3, 16), (3, 8), (100, 16), (1000, 24), (2, 2)])
def test_value_bits_leave_headroom_for_n_summands(n: int, ring: int) -> None:
    b = update_codec.value_bits_for(n, ring)
    assert n * ((1 << b) - 1) <= (1 << ring) - 1  # the sum cannot wrap
    assert n * ((1 << (b + 1)) - 1) > (1 << ring) - 1  # and no finer resolution would fit


def test_value_bits_refuse_a_ring_too_small() -> None:
    with pytest.raises(ConfigError):
        update_codec.value_bits_for(5, 2)


def test_block_magnitude_and_expand() -> None:
    acc = np.array([1, -1, 2, -2, 3], np.float32)
    np.testing.assert_allclose(update_codec.block_magnitude(acc, 2), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(update_codec.expand_blocks(np.array([1, 2, 3], np.float32), 2, 5), [1, 1, 2, 2, 3])


def test_values_codec_and_ring_reduction() -> None:
    v = np.array([0.5, -0.25, 1e-3], np.float32)
    for dt in ("float32", "float16"):
        out = update_codec.decode_values(update_codec.encode_values(v, dt), dt, 3)
        np.testing.assert_allclose(out, v, rtol=1e-3)
    with pytest.raises(SchemaError):
        update_codec.decode_values(b"\x00" * 5, "float32", 1)
    with pytest.raises(SchemaError):
        update_codec.decode_values(np.array([np.inf], np.float32).tobytes(), "float32", 1)
    total = np.array([0x12345678, 0xFFFFFFFF], np.uint32)
    np.testing.assert_array_equal(update_codec.reduce_ring(total, 16), [0x5678, 0xFFFF])
    assert update_codec.reduce_ring(total, 32) is total


@pytest.mark.parametrize(("n", "v"), [(3, 4), (3, 6), (3, 14), (1, 31), (100, 8), (1000, 22)])
def test_ring_for_fits_exactly(n: int, v: int) -> None:
    ring, vb = update_codec.ring_for(n, v)
    assert vb == v and n * ((1 << v) - 1) <= (1 << ring) - 1 < 2 * n * ((1 << v) - 1) + 1
    assert update_codec.value_bits_for(n, ring) >= v


def test_ring_for_defaults_and_refusals() -> None:
    assert update_codec.ring_for(3, 0) == (32, update_codec.value_bits_for(3, 32))
    with pytest.raises(ConfigError):
        update_codec.ring_for(1000, 30)
