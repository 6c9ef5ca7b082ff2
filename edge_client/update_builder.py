"""From a trained adapter delta to what goes on the wire. Pure: arrays in, arrays and bytes out.

Every path keeps an error-feedback residual: what this round does not send (coordinates off the
index set, the clipped-off part, float16 rounding) is added to the next round's delta, so it is
delayed rather than lost. Quantization noise of secure aggregation is not fed back: stochastic
rounding is unbiased.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared import messages as M
from shared import dp, sparse, update_codec
from shared.secagg.quant import quantize


class NonFiniteInput(ValueError):
    """The contribution holds NaN or Inf after it was built: it must not be masked."""


@dataclass(frozen=True)
class Built:
    """One round's contribution.

    sent: the dense float32 vector this device contributes, unweighted (what the aggregator's
        mean includes for it, up to quantization); kept for the device's own audit trail.
    residual: the error-feedback state for the next round.
    values: bytes for a SparseUpdate (secure aggregation off), else b"".
    encoding: SparseUpdate.encoding, or "" for secure aggregation.
    x: the uint32 input to secure aggregation (len k), or None.
    """

    sent: np.ndarray
    residual: np.ndarray
    values: bytes = b""
    encoding: str = ""
    x: np.ndarray | None = None
    clipped: float = 0.0  # fraction of sent coordinates that hit the clip (the rest waits in the residual)
    l2_factor: float = 1.0  # under DP: what the whole-vector L2 clip scaled the input by (1: inside the clip)


def _accumulate(delta: np.ndarray, residual: np.ndarray | None) -> np.ndarray:
    acc = np.asarray(delta, dtype=np.float32).copy()
    if residual is not None:
        acc += residual
    return acc


def plain(delta: np.ndarray, residual: np.ndarray | None, sp: M.SparseSpec) -> Built:
    """Secure aggregation off: values on the shared index set, or this device's own top-k."""
    acc = _accumulate(delta, residual)
    if sp.method == "device_topk":
        data = sparse.topk_encode(acc, sp.k, sp.value_dtype)
        idx, vals = sparse.topk_decode(data, sp.dim)
        encoding = "topk"
    else:
        idx = update_codec.round_indices(sp)
        assert idx is not None
        data = update_codec.encode_values(acc[idx], sp.value_dtype)
        vals = update_codec.decode_values(data, sp.value_dtype, len(idx))  # exactly what arrives
        encoding = "shared"
    sent = sparse.scatter(vals, idx, sp.dim)
    return Built(sent=sent, residual=acc - sent, values=data, encoding=encoding)


def secure(delta: np.ndarray, residual: np.ndarray | None, sp: M.SparseSpec, sa: M.SecAggSpec,
           num_examples: int, rng_seed: np.random.SeedSequence | int | None = None, train_loss: float = 0.0,
           scores: np.ndarray | None = None) -> Built:
    """Secure aggregation on: clip on the shared index set, weight, fixed-point encode into the ring.

    The weight and the weighted training loss ride in the masked tail (``update_codec.tail``), so
    the aggregator learns the weighted mean without any device's weight or loss. ``scores`` (an
    fl-minillm client-teacher round's scoring vector, probabilities in [0, 1]) go between the
    sketch and the tail, weighted the same way: the aggregator learns only the fleet's mean.
    With ``sa.dp`` the fixed-point encoding is replaced by the DP stage (``_secure_dp``).
    """
    idx = update_codec.round_indices(sp)
    assert idx is not None, "device_topk is refused with secure aggregation"
    delta = np.asarray(delta, dtype=np.float32)
    values, new_residual = sparse.project(delta, residual, idx, sa.clip)
    clipped = float(np.mean(np.abs(values) >= sa.clip)) if len(values) else 0.0
    w = update_codec.weight(num_examples, sa.weight_norm)
    x_float = values.astype(np.float64) * w
    if sa.sketch_block:
        acc = delta if residual is None else delta + residual
        sketch = np.minimum(update_codec.block_magnitude(acc, sa.sketch_block), sa.clip)
        x_float = np.concatenate([x_float, sketch.astype(np.float64) * w])
    if scores is not None:
        x_float = np.concatenate([x_float, update_codec.scores_to_ring(scores, w, sa.clip)])
    x_float = np.concatenate([x_float, update_codec.tail(w, train_loss, sa.clip)])
    bad = int(np.size(x_float) - np.count_nonzero(np.isfinite(x_float)))
    if bad or not np.isfinite(new_residual).all():
        # After the device's own check of its delta (a NaN from the residual, the scores, a
        # bug): once masked nobody could tell, and the sum would be garbage.
        raise NonFiniteInput(f"non-finite secure input: {bad} of {x_float.size} values are NaN or Inf after clipping")
    # Fresh OS entropy by default: a reproducible rounding pattern would be a side channel.
    seed = rng_seed if rng_seed is not None else np.random.SeedSequence()
    if sa.dp is not None:
        return _secure_dp(x_float, values, idx, new_residual, sp, sa.dp, sa.ring_bits, seed, clipped)
    x = quantize(x_float, update_codec.quant_config(sa), seed)
    return Built(sent=sparse.scatter(values, idx, sp.dim), residual=new_residual, x=x, clipped=clipped)


def _secure_dp(x_float: np.ndarray, values: np.ndarray, idx: np.ndarray, residual: np.ndarray, sp: M.SparseSpec,
               spec: dp.DPSpec, ring_bits: int, seed: np.random.SeedSequence | int, clipped: float) -> Built:
    """The DP stage (``shared.dp.encode``): the whole input, values to tail, L2-clipped, rotated,
    scaled, rounded and noised into the ring. The weight in the tail is at most 1 (``weight_norm``
    is 1), so the L2 clip bounds everything one device adds to the sum.

    What the L2 clip cuts off the values goes back to the residual like the per-coordinate clip's:
    it stays on the device, so feeding it back costs no privacy; what was sent is what was
    clipped, before the noise.
    """
    x, f = dp.encode(x_float, spec, ring_bits, np.random.default_rng(seed))
    sent_values = (values.astype(np.float64) * f).astype(np.float32)
    residual = residual + sparse.scatter(values - sent_values, idx, sp.dim)
    return Built(sent=sparse.scatter(sent_values, idx, sp.dim), residual=residual, x=x, clipped=clipped, l2_factor=f)
