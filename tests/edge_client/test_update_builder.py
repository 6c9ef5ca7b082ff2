"""The device's update path, pure: what it sends plus what it keeps equals what it had."""

from __future__ import annotations

import numpy as np
import pytest

from edge_client import update_builder
from shared import messages as M
from shared import sparse, update_codec
from shared.secagg.quant import dequantize_sum

DIM, K = 1000, 100


def _sp(method: str = "random", dtype: str = "float32") -> M.SparseSpec:
    idx = sparse.encode_indices(sparse.random_k(DIM, K, 3), DIM) if method in ("random", "topk") else b""
    return M.SparseSpec(method=method, dim=DIM, k=K, seed=3, indices=idx, value_dtype=dtype)  # type: ignore[arg-type]


def _sa(sketch: int = 0, ring: int = 16) -> M.SecAggSpec:
    return M.SecAggSpec(node_ids=(0, 1, 2), threshold=2, graph_seed=bytes(32), clip=0.05, ring_bits=ring,
                        value_bits=update_codec.value_bits_for(3, ring), weight_norm=10, sketch_block=sketch)


def test_plain_shared_index_conserves_mass() -> None:
    rng = np.random.default_rng(0)
    delta, res = rng.normal(0, 0.01, DIM).astype(np.float32), rng.normal(0, 0.01, DIM).astype(np.float32)
    for dtype in ("float32", "float16"):
        b = update_builder.plain(delta, res, _sp(dtype=dtype))
        np.testing.assert_allclose(b.sent + b.residual, delta + res, atol=1e-7)
        assert np.count_nonzero(b.sent) <= K and b.encoding == "shared" and len(b.values) == K * (4 if dtype == "float32" else 2)


def test_plain_device_topk_sends_the_largest() -> None:
    delta = np.zeros(DIM, np.float32)
    delta[[5, 500, 999]] = [1.0, -2.0, 3.0]
    b = update_builder.plain(delta, None, _sp("device_topk"))
    assert b.encoding == "topk"
    assert set(np.flatnonzero(b.sent)) == {5, 500, 999}
    np.testing.assert_allclose(b.residual, 0, atol=1e-3)  # float16 rounding is all that is kept back


def test_secure_clips_weights_and_keeps_the_rest() -> None:
    rng = np.random.default_rng(1)
    delta = rng.normal(0, 0.05, DIM).astype(np.float32)
    sp, sa = _sp(), _sa()
    b = update_builder.secure(delta, None, sp, sa, num_examples=5, rng_seed=7)
    idx = update_codec.round_indices(sp)
    assert b.x is not None and b.x.dtype == np.uint32 and b.x.shape == (K + update_codec.TAIL,)
    assert np.abs(b.sent).max() <= sa.clip and 0 < b.clipped < 1
    np.testing.assert_allclose(b.sent + b.residual, delta, atol=1e-7)
    # Decoding the one input gives weight * sent values within one quantization step.
    cfg = update_codec.quant_config(sa)
    decoded = dequantize_sum(b.x, cfg, 1)
    np.testing.assert_allclose(decoded[:K], 0.5 * b.sent[idx], atol=1.0 / cfg.scale + 1e-9)


def test_secure_sketch_follows_the_unsent_mass() -> None:
    delta = np.zeros(DIM, np.float32)
    delta[640:704] = 0.04  # one block of 64 with all the mass
    sp, sa = _sp(), _sa(sketch=64, ring=32)
    b = update_builder.secure(delta, None, sp, sa, num_examples=10, rng_seed=1)
    assert b.x is not None and len(b.x) == update_codec.secagg_dim(sp, sa) == K + 16 + update_codec.TAIL
    sketch = dequantize_sum(b.x[K : K + 16], update_codec.quant_config(sa), 1)
    assert int(np.argmax(sketch)) == 10 and abs(sketch[10] - 0.04) < 1e-6
    assert np.abs(np.delete(sketch, 10)).max() < 1e-6


def test_secure_tail_carries_weight_and_loss_masked() -> None:
    """The weight and the weighted loss are two more coordinates of the masked vector."""
    sp, sa = _sp(), _sa(ring=32)
    delta = np.full(DIM, 0.01, np.float32)
    b = update_builder.secure(delta, None, sp, sa, num_examples=5, rng_seed=3, train_loss=2.5)
    cfg = update_codec.quant_config(sa)
    w, wl = update_codec.untail(dequantize_sum(b.x[K:], cfg, 1), sa.clip)
    assert w == pytest.approx(0.5, abs=1e-5) and wl / w == pytest.approx(2.5, abs=1e-3)
