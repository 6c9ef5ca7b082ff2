"""What both sides derive from a RoundSpec to encode and decode an update. Pure numpy.

The aggregator and every device must compute the same index set, the same fixed-point encoding
and the same weights from the signed spec alone, so the rules live here, once.
"""

from __future__ import annotations

import numpy as np

from shared import messages as M
from shared import dp, sparse
from shared.errors import ConfigError, SchemaError
from shared.secagg.quant import QuantConfig

_VALUE_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


def round_indices(sp: M.SparseSpec) -> np.ndarray | None:
    """The round's shared index set (sorted uint32), or None when each device picks its own."""
    if sp.method == "dense":
        return np.arange(sp.dim, dtype=np.uint32)
    if sp.method in ("random", "topk"):
        idx = sparse.decode_indices(sp.indices, sp.dim)
        if len(idx) != sp.k:
            raise SchemaError(f"round index set has {len(idx)} entries, the spec says k = {sp.k}")
        return idx
    return None


def sketch_len(sp: M.SparseSpec, sa: M.SecAggSpec) -> int:
    """Blocks in the magnitude sketch that follows the k values (0 without a sketch)."""
    return -(-sp.dim // sa.sketch_block) if sa.sketch_block else 0


# After the k values and the sketch, two more masked coordinates: the device's FedAvg weight and
# its weight times its training loss. The aggregator learns both only as sums over the fleet.
TAIL = 2
LOSS_CAP = 20.0  # a training loss above this is reported as this (it only scales the tail slot)


def scoring_len(sc: M.ScoringSpec | None) -> int:
    return sc.values if sc is not None else 0


def secagg_dim(sp: M.SparseSpec, sa: M.SecAggSpec, sc: M.ScoringSpec | None = None) -> int:
    """Length of each device's secure-aggregation input: k values, the sketch, the scoring vector
    of an fl-minillm client-teacher round, then the tail."""
    return sp.k + sketch_len(sp, sa) + scoring_len(sc) + TAIL


def masked_dim(sp: M.SparseSpec, sa: M.SecAggSpec, sc: M.ScoringSpec | None = None) -> int:
    """Length of the vector that is masked and sent: ``secagg_dim``, or under DP its rotation's
    padded length (the randomized Hadamard transform needs a power of two)."""
    n = secagg_dim(sp, sa, sc)
    return dp.ring_dim(n) if sa.dp is not None else n


def scores_to_ring(scores: np.ndarray, w: float, clip: float) -> np.ndarray:
    """Probabilities in [0, 1] -> values in [-clip, clip] (the quantizer's whole range), weighted."""
    return (2.0 * np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0) - 1.0) * clip * w


def scores_from_sum(summed: np.ndarray, weight: float, clip: float) -> np.ndarray:
    """The summed scoring slots and the summed weight -> the contributors' weighted mean scores."""
    return (np.asarray(summed, dtype=np.float64) / weight / clip + 1.0) / 2.0


def clamp_loss(train_loss: float) -> float:
    """A training loss into [0, LOSS_CAP] (non-finite: the cap), as both kinds of round count it."""
    return min(max(float(train_loss), 0.0), LOSS_CAP) if np.isfinite(train_loss) else LOSS_CAP


def tail(w: float, train_loss: float, clip: float) -> np.ndarray:
    """The masked tail of one device: weight and weighted loss, scaled into [0, clip]."""
    return np.array([w * clip, w * clamp_loss(train_loss) / LOSS_CAP * clip], dtype=np.float64)


def untail(summed: np.ndarray, clip: float) -> tuple[float, float]:
    """(sum of weights, sum of weight x loss) from the summed tail."""
    if len(summed) != TAIL:
        raise SchemaError(f"secure-aggregation tail has {len(summed)} values, expected {TAIL}")
    return float(summed[0]) / clip, float(summed[1]) / clip * LOSS_CAP


def block_magnitude(acc: np.ndarray, block: int) -> np.ndarray:
    """Mean |acc| over consecutive blocks of ``block`` coordinates (the last one may be short)."""
    a = np.abs(np.asarray(acc, dtype=np.float64))
    n = -(-a.size // block)
    sums = np.add.reduceat(a, np.arange(0, a.size, block)) if a.size else np.zeros(0)
    sizes = np.full(n, block, dtype=np.float64)
    if n and a.size % block:
        sizes[-1] = a.size % block
    return (sums / sizes).astype(np.float32)


def expand_blocks(block_scores: np.ndarray, block: int, dim: int) -> np.ndarray:
    """Per-coordinate scores from per-block ones."""
    return np.repeat(np.asarray(block_scores, dtype=np.float32), block)[:dim]


def value_bits_for(n: int, ring_bits: int) -> int:
    """Finest per-value resolution such that n values summed stay below 2^ring_bits."""
    if n < 1 or not 1 <= ring_bits <= 32:
        raise ConfigError(f"need n >= 1 and ring_bits in 1..32, got n={n}, ring_bits={ring_bits}")
    bits = (((1 << ring_bits) - 1) // n + 1).bit_length() - 1
    if bits < 1:
        raise ConfigError(f"{n} devices cannot share a {ring_bits}-bit ring")
    return bits


def ring_for(n: int, value_bits: int) -> tuple[int, int]:
    """(ring_bits, value_bits) for n summands: the smallest ring holding n values of value_bits
    bits each; value_bits 0 means the finest resolution a 32-bit ring allows."""
    if n < 1:
        raise ConfigError(f"need at least one summand, got {n}")
    if value_bits == 0:
        return 32, value_bits_for(n, 32)
    ring = (n * ((1 << value_bits) - 1)).bit_length()
    if ring > 32:
        raise ConfigError(f"{n} devices x {value_bits}-bit values do not fit a 32-bit ring; "
                          f"use value_bits <= {value_bits_for(n, 32)} (or 0)")
    return ring, value_bits


def quant_config(sa: M.SecAggSpec) -> QuantConfig:
    return QuantConfig(clip=sa.clip, n_summands=len(sa.node_ids), bits=sa.value_bits)


def weight(num_examples: int, norm: int) -> float:
    """A device's FedAvg weight scaled into [0, 1], so weighted values stay inside the clip range.

    The aggregator sends ``weight_norm = 1``: every device with data weighs exactly 1, so the
    summed weight slot must equal the number of contributors (``slot_bounds``)."""
    return min(max(num_examples, 0), norm) / norm


def slot_bounds(sp: M.SparseSpec, sa: M.SecAggSpec, sc: M.ScoringSpec | None, n: int) -> dict[str, tuple[float, float]]:
    """What the decoded sum of each named slot of n honest devices' inputs can be, before the
    quantization bound: values and scores in [-n clip, n clip], the sketch and the loss in
    [0, n clip], the weight exactly n clip (each device weighs 1). Under DP the L2 clip may scale
    a device's whole input down, its weight slot with it: the weight is then in [0, n clip] (the
    mean's denominator stays the number of contributors, as in DP-FedAvg), and the noise
    allowance is the caller's (``shared.dp.noise_allowance``)."""
    c = n * sa.clip
    return {"values": (-c, c), "sketch": (0.0, c), "scores": (-c, c), "weight": (0.0 if sa.dp is not None else c, c),
            "loss": (0.0, c)}


def encode_values(values: np.ndarray, dtype: str) -> bytes:
    return np.asarray(values, dtype=_VALUE_DTYPES[dtype]).tobytes()


def decode_values(data: bytes, dtype: str, k: int) -> np.ndarray:
    dt = _VALUE_DTYPES[dtype]
    if len(data) != k * dt.itemsize:
        raise SchemaError(f"{len(data)} value bytes, expected {k} x {dtype}")
    v = np.frombuffer(data, dtype=dt).astype(np.float32)
    if not np.isfinite(v).all():
        raise SchemaError("non-finite values in a sparse update")
    return v


def reduce_ring(total: np.ndarray, ring_bits: int) -> np.ndarray:
    """The uint32 accumulator (sums mod 2^32) reduced into the spec's ring."""
    if ring_bits == 32:
        return total
    return (total & np.uint32((1 << ring_bits) - 1)).astype(np.uint32)
