"""Distributed differential privacy inside the masked sum: the Skellam mechanism in the ring.

Each device turns its whole float contribution (values, sketch, scores, tail) into integers and
adds its own share of the noise *before* masking, so the aggregator only ever unmasks a sum that
already carries the target noise (Agarwal, Kairouz, Liu, "The Skellam Mechanism for
Differentially Private Federated Learning", NeurIPS 2021, arXiv 2110.04995). The device stages,
in order, each a pure function here:

1. ``clip_l2``: scale the whole vector to L2 norm <= ``l2_clip``. This bounds one device's
   sensitivity (add/remove one device); the per-coordinate clip of the plain path bounds none.
2. ``rotate``: a randomized Hadamard transform (random signs from the spec's seed, then the
   normalized Walsh-Hadamard transform in blocks of a power of two, ``layout``). It is
   orthogonal, so the L2 norm is unchanged, but it spreads a spiky vector evenly over the
   coordinates, which is what makes the integer grid's rounding and the ring's wrap-around small
   and predictable. Blocks rather than one transform padded to the next power of two: padding
   8,322 coordinates to 16,384 would double every masked upload; blocks of 1,024 cost 11 %.
3. scale by ``scale`` and round stochastically to integers, *conditionally*: redraw until the
   rounded vector's norm is within ``rounded_l2_bound`` (Kairouz, Liu, Steinke 2021, Theorem 1),
   so the integer sensitivity holds for every draw, not only with high probability.
4. add Skellam noise, Poisson(lam) - Poisson(lam) per coordinate, of variance
   (scale * noise_multiplier * l2_clip)^2 / quorum. Sums of independent Skellams are Skellam, so
   ``m`` surviving devices give exactly the Skellam mechanism of variance m / quorum times the
   target: the noise is calibrated for the quorum (the fewest survivors secure aggregation ever
   unmasks), so a dropout never lowers it below target; more survivors only add noise.
5. reduce mod 2^ring_bits (two's complement), ready for masking.

The aggregator's inverse (``decode_sum``) centres the ring sum, divides by ``scale`` and rotates
back. ``scale`` is sized like TFF's ``DistributedDpSumFactory``: the largest scale for which the
analytic probability that any coordinate of the sum wraps around the ring (``wrap_bound``) stays
under a target. Pure: numpy and the standard library only.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from shared.errors import ConfigError, SchemaError

# Conditional rounding redraws at most with probability 1 - beta; TFF's default exp(-0.5) makes
# sqrt(2 ln(1/beta)) = 1 in the norm bound and costs about 1.6 draws on average.
ROUNDING_BETA = math.exp(-0.5)
MAX_ROUNDING_TRIES = 1000  # at beta = exp(-0.5) a thousand failed draws has probability ~1e-400
SEED_BYTES = 32
MAX_RING_DIM = 1 << 28  # the padded length; far above any adapter here (shared.sparse.MAX_DIM-sized)
# Rotation blocks: one transform up to ONE_BLOCK coordinates (padding a small vector costs
# little); above, the largest power-of-two block that pads by at most 1/PAD_SHARE, but no block
# smaller than MIN_BLOCK, so each block still spreads a spike over many coordinates.
ONE_BLOCK, MIN_BLOCK, PAD_SHARE = 4096, 1024, 16
# numpy's Poisson sampler is accurate up to about this mean (measured: variance off by 0.4 % at
# 1e13, 4 % at 1e15, 41 % at 1e16). Noise of std 1.4e6 integer units already makes rounding
# (variance 1/4) irrelevant, so the scale is capped here rather than sampled in pieces.
MAX_POISSON_MEAN = 1e12


@dataclass(frozen=True)
class DPSpec:
    """The DP parameters of one secure round, signed in the round spec (``SecAggSpec.dp``).

    mechanism: "skellam" (the only one): integer noise whose sum over devices stays Skellam.
    l2_clip: c, the L2 norm bound of one device's whole float contribution.
    noise_multiplier: z; the sum of ``quorum`` devices' noise has std z * c per coordinate (in
        the float units of the contribution).
    quorum: the fewest survivors the noise is calibrated for; a device refuses a round whose
        secure-aggregation threshold is below it (a smaller sum could be unmasked).
    scale: integer units per float unit after rotation (sized by ``size_scale``).
    rotation_seed: 32 bytes; the randomized Hadamard transform's signs (``rotation_signs``).
    """

    mechanism: Literal["skellam"]
    l2_clip: float
    noise_multiplier: float
    quorum: int
    scale: float
    rotation_seed: bytes

    def __post_init__(self) -> None:
        if self.mechanism != "skellam":
            raise SchemaError(f"DPSpec.mechanism must be 'skellam', got {self.mechanism!r}")
        for name in ("l2_clip", "noise_multiplier", "scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise SchemaError(f"DPSpec.{name} must be a finite number > 0, got {v!r}")
        if isinstance(self.quorum, bool) or not isinstance(self.quorum, int) or self.quorum < 1:
            raise SchemaError(f"DPSpec.quorum must be an int >= 1, got {self.quorum!r}")
        if not isinstance(self.rotation_seed, bytes) or len(self.rotation_seed) != SEED_BYTES:
            raise SchemaError(f"DPSpec.rotation_seed must be {SEED_BYTES} bytes")
        if self.local_variance / 2 > MAX_POISSON_MEAN:
            raise SchemaError(f"DPSpec: scale {self.scale:g} asks each device for Poisson noise of mean "
                              f"{self.local_variance / 2:.3g}, above the {MAX_POISSON_MEAN:g} it can draw exactly")

    @property
    def sum_std(self) -> float:
        """Target noise std of the sum per coordinate, in float units, with ``quorum`` survivors."""
        return self.noise_multiplier * self.l2_clip

    @property
    def local_variance(self) -> float:
        """Variance of one device's integer Skellam noise per coordinate."""
        return (self.scale * self.sum_std) ** 2 / self.quorum


def layout(n: int) -> tuple[int, int]:
    """(padded length, block) of the rotation of an n-coordinate contribution: the padded length
    is a multiple of the block, a power of two (what the Walsh-Hadamard transform needs)."""
    if not 1 <= n <= MAX_RING_DIM:
        raise ConfigError(f"a DP contribution must have 1..{MAX_RING_DIM} coordinates, got {n}")
    p2 = 1 << (n - 1).bit_length()
    if p2 <= ONE_BLOCK:
        return p2, p2
    block = p2
    while block > MIN_BLOCK and -(-n // block) * block - n > n // PAD_SHARE:
        block //= 2
    return -(-n // block) * block, block


def ring_dim(n: int) -> int:
    """Length of the rotated (and masked) vector for an n-coordinate contribution (``layout``)."""
    return layout(n)[0]


def clip_l2(x: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """(x scaled to L2 norm <= c, the factor used, 1.0 when x was inside)."""
    x = np.asarray(x, dtype=np.float64)
    norm = float(np.linalg.norm(x))
    f = 1.0 if norm <= c else c / norm
    return x * f, f


def rotation_signs(seed: bytes, d: int) -> np.ndarray:
    """d random +-1 from SHAKE-256 of the seed: the same on every device and on the aggregator,
    whatever numpy's generators do across versions."""
    bits = np.unpackbits(np.frombuffer(hashlib.shake_256(b"fl-dp-rotation\x00" + seed).digest((d + 7) // 8), dtype=np.uint8))
    return 1.0 - 2.0 * bits[:d].astype(np.float64)


def fwht(a: np.ndarray, block: int | None = None) -> np.ndarray:
    """The normalized Walsh-Hadamard transform of each consecutive ``block`` of a (default: all
    of it): orthogonal and its own inverse; the block a power of two dividing len(a)."""
    a = np.asarray(a, dtype=np.float64)
    d = a.size
    block = block or d
    assert block and block & (block - 1) == 0 and d % block == 0, "fwht needs power-of-two blocks"
    h = 1
    while h < block:
        b = a.reshape(-1, 2, h)  # (groups, pair, h): the butterflies of this stage, within each block
        a = np.stack([b[:, 0] + b[:, 1], b[:, 0] - b[:, 1]], axis=1).reshape(d)
        h *= 2
    return a / math.sqrt(block)


def rotate(x: np.ndarray, seed: bytes) -> np.ndarray:
    """H D x on x zero-padded to ``ring_dim``: D the seeded signs, H the normalized Hadamard of
    each block (``layout``)."""
    x = np.asarray(x, dtype=np.float64)
    d, block = layout(x.size)
    padded = np.zeros(d, dtype=np.float64)
    padded[: x.size] = x
    return fwht(padded * rotation_signs(seed, d), block)


def unrotate(y: np.ndarray, seed: bytes, n: int) -> np.ndarray:
    """The inverse of ``rotate``, truncated to the n coordinates of the contribution."""
    y = np.asarray(y, dtype=np.float64)
    d, block = layout(n)
    if y.size != d:
        raise ConfigError(f"a rotated {n}-coordinate contribution has {d} coordinates, got {y.size}")
    return (fwht(y, block) * rotation_signs(seed, d))[:n]


def rounded_l2_bound(l2: float, d: int, beta: float = ROUNDING_BETA) -> float:
    """The L2 norm a d-vector of norm <= l2 may have after conditional stochastic rounding
    (Kairouz, Liu, Steinke 2021, Theorem 1; TFF's ``rounded_l2_norm_bound``)."""
    plain = l2 + math.sqrt(d)  # every coordinate moved by < 1
    if beta <= 0:
        return plain
    sq = l2 * l2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (l2 + math.sqrt(d) / 2)
    return min(plain, math.sqrt(sq))


def sensitivity(spec: DPSpec, d: int) -> tuple[float, float]:
    """(L1, L2) sensitivity of one device's integer vector (add/remove one device). An integer
    vector's L1 norm is at most min(sqrt(d) L2, L2^2), since |v| <= v^2 for integers."""
    l2 = rounded_l2_bound(spec.scale * spec.l2_clip, d)
    return l2 * min(math.sqrt(d), l2), l2


def round_conditional(v: np.ndarray, bound: float, rng: np.random.Generator) -> np.ndarray:
    """Unbiased stochastic rounding to int64, redrawn until the L2 norm is <= bound."""
    lo = np.floor(v)
    frac = v - lo
    for _ in range(MAX_ROUNDING_TRIES):
        q = lo + (rng.random(v.shape) < frac)
        if float(np.linalg.norm(q)) <= bound:
            return q.astype(np.int64)
    raise ConfigError(f"stochastic rounding exceeded its norm bound {bound:.4g} {MAX_ROUNDING_TRIES} times; "
                      "the input was not clipped")


def skellam(shape: int | tuple[int, ...], variance: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam noise (int64) of the given variance: Poisson(v/2) - Poisson(v/2)."""
    lam = variance / 2
    return rng.poisson(lam, shape).astype(np.int64) - rng.poisson(lam, shape).astype(np.int64)


def encode(x: np.ndarray, spec: DPSpec, ring_bits: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A device's float contribution -> (its noisy uint32 input in Z_2^ring_bits, the L2 clip factor).

    ``rng`` must be fresh OS entropy in production (``np.random.default_rng()``): a device's noise
    that someone else could reproduce protects nothing.
    """
    clipped, f = clip_l2(x, spec.l2_clip)
    v = rotate(clipped, spec.rotation_seed) * spec.scale
    d = v.size
    q = round_conditional(v, rounded_l2_bound(spec.scale * spec.l2_clip, d), rng)
    noisy = q + skellam(d, spec.local_variance, rng)
    return np.mod(noisy, 1 << ring_bits).astype(np.uint32), f


def centre(total: np.ndarray, ring_bits: int) -> np.ndarray:
    """Ring elements as signed integers in [-2^(b-1), 2^(b-1)) (two's complement)."""
    v = np.asarray(total, dtype=np.uint32).astype(np.int64) & ((1 << ring_bits) - 1)
    half = 1 << (ring_bits - 1)
    return np.where(v >= half, v - (1 << ring_bits), v)


def decode_sum(total: np.ndarray, spec: DPSpec, ring_bits: int, n: int) -> np.ndarray:
    """The unmasked ring sum -> the float sum of the clipped contributions plus the noise (length n)."""
    return unrotate(centre(total, ring_bits).astype(np.float64) / spec.scale, spec.rotation_seed, n)


def check_round(spec: DPSpec, threshold: int) -> str:
    """Why a device must refuse this DP round whatever its own floors say, or "".

    Secure aggregation unmasks any survivor set of at least ``threshold`` devices: with fewer
    survivors than the quorum the noise would fall below target, so the quorum may not exceed it.
    """
    if spec.quorum > threshold:
        return (f"DP noise is calibrated for {spec.quorum} survivors but secure aggregation unmasks sums of as few "
                f"as {threshold}: such a sum would carry less than the target noise")
    return ""


# -- tails: the wrap-around bound and the aggregator's noise allowance ------------------------

def skellam_tail(variance: float, t: float, d: int = 1) -> float:
    """Chernoff bound on P(|sum_j w_j N_j| >= t) for d iid Skellam N_j of the given variance and
    weights |w_j| = 1/sqrt(d) (d = 1: one coordinate; d > 1: a coordinate after rotating back).

    The Skellam MGF is E exp(s N) = exp(variance (cosh s - 1)); the best s has a closed form.
    """
    if t <= 0:
        return 1.0
    if variance <= 0:
        return 0.0
    rd = math.sqrt(d)
    s = rd * math.asinh(t / (variance * rd))
    log_p = variance * d * 2 * math.sinh(s / rd / 2) ** 2 - s * t  # cosh x - 1 = 2 sinh^2(x/2), no cancellation
    return min(1.0, 2 * math.exp(log_p))


def wrap_bound(spec: DPSpec, n: int, dim: int, ring_bits: int) -> float:
    """An upper bound on the probability that any coordinate of the sum of n devices' inputs
    (all of them surviving: the most noise) leaves [-2^(b-1), 2^(b-1)) and wraps around the ring.

    Per rotated coordinate the sum is A + R + N: A the rotated sum of the scaled clipped inputs
    (a Rademacher sum over the random signs of its block of B, |A| >= t with probability
    <= 2 exp(-t^2 B / 2 |S|^2), |S| <= n scale c, Hoeffding), R the rounding errors (|R| < n,
    always) and N the Skellam noise of
    variance n times the local one (``skellam_tail``). The ring's half-width less n is split
    between A and N in proportion to their scales; a union bound covers the d coordinates. Assumes
    the rotation seed is drawn independently of the inputs (the aggregator draws it per round).
    """
    d, block = layout(dim)
    half = (1 << (ring_bits - 1)) - 1 - n
    if half <= 0:
        return 1.0
    s_a = n * spec.scale * spec.l2_clip / math.sqrt(block)
    var_n = n * spec.local_variance
    s_n = math.sqrt(var_n)
    k = half / (s_a + s_n)
    p = 2 * math.exp(-k * k / 2) + skellam_tail(var_n, k * s_n)
    return min(1.0, d * p)


def size_scale(l2_clip: float, noise_multiplier: float, quorum: int, n: int, dim: int, ring_bits: int,
               wrap_probability: float) -> float:
    """The largest scale (finest grid: least rounding) whose ``wrap_bound`` for n devices is at
    most ``wrap_probability``, as TFF's DistributedDpSumFactory sizes its scale from bits, k and
    the modular-clipping probability, up to the cap of exact Poisson sampling. Raises
    ConfigError when no scale fits the ring."""

    def bound(scale: float) -> float:
        return wrap_bound(DPSpec("skellam", l2_clip, noise_multiplier, quorum, scale, bytes(SEED_BYTES)), n, dim, ring_bits)

    # Above this scale a device's Poisson mean passes MAX_POISSON_MEAN (see there).
    cap = math.sqrt(2 * MAX_POISSON_MEAN * quorum) / (noise_multiplier * l2_clip) * (1 - 1e-9)
    lo, hi = 1e-12, cap
    if bound(hi) <= wrap_probability:
        return hi
    if bound(lo) > wrap_probability:
        raise ConfigError(f"a {ring_bits}-bit ring cannot hold the DP sum of {n} devices at wrap probability "
                          f"{wrap_probability:g}")
    for _ in range(200):  # bisect in log space: the bound grows with the scale
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if bound(mid) <= wrap_probability else (lo, mid)
        if hi / lo < 1 + 1e-9:
            break
    # The grid must be finer than the noise, or rounding, not the mechanism, dominates the sum.
    if lo * noise_multiplier * l2_clip / math.sqrt(quorum) < 1.0:
        raise ConfigError(f"a {ring_bits}-bit ring leaves one device's DP noise below one integer step for {n} "
                          f"devices (scale {lo:.3g}); use a larger ring or fewer devices")
    return lo


def noise_allowance(spec: DPSpec, n: int, dim: int, p_false: float = 1e-9) -> float:
    """How far (in float units) the noise of n contributors may move one decoded coordinate of the
    sum, except with probability ``p_false`` over all ``dim`` coordinates together.

    The aggregator's bounds check widens each slot's range by this: an honest noisy sum must pass
    (a false rejection drops a good round), while an input far outside the range still fails.
    After rotating back, a coordinate's noise is a +-1/sqrt(B) weighted sum of the Skellam noise
    of the B rotated coordinates of its block (``skellam_tail`` with B), plus rounding errors,
    zero-mean in an interval of length 1 per device (Hoeffding: 2 exp(-2 t^2 / n); conditional
    rounding shifts this only slightly, and only towards smaller errors).
    """
    block = layout(dim)[1]
    var_n = n * spec.local_variance
    s_n, s_r = math.sqrt(var_n), math.sqrt(n) / 2

    def fails(k: float) -> float:
        return dim * (skellam_tail(var_n, k * s_n, block) + 2 * math.exp(-2 * (k * s_r) ** 2 / n))

    lo, hi = 0.0, 1.0
    while fails(hi) > p_false:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fails(mid) <= p_false else (mid, hi)
    return hi * (s_n + s_r) / spec.scale
