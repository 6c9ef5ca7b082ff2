"""Fixed-point encoding of float updates into Z_2^32 so that masked sums do not wrap.

Each coordinate is clipped to [-c, c], shifted to [0, 2c], scaled to [0, L] and rounded
stochastically (unbiased: E[q] = (x + c) * scale). L is chosen from the number of summands n so
that n * L <= 2^32 - 1: the modular sum of n encodings then equals their integer sum and can be
decoded exactly, without the silent overflow Flower only warns about past 1024 summands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared.errors import ConfigError

MODULUS_BITS = 32
_MAX_SUM = (1 << MODULUS_BITS) - 1


@dataclass(frozen=True)
class QuantConfig:
    """How floats become uint32 for one round.

    clip: inputs are clipped to [-clip, clip]; pick it from the update's scale (LoRA deltas are
        small, so Flower's default of 8.0 wastes resolution).
    n_summands: the most vectors that will ever be added (the cohort size); sets the headroom.
    bits: per-coordinate resolution, L = 2^bits - 1 levels. ``None`` takes the finest L that
        still fits n_summands summands in 32 bits.
    """

    clip: float
    n_summands: int
    bits: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"QuantConfig.clip must be a finite number > 0, got {self.clip!r}")
        if not isinstance(self.n_summands, int) or self.n_summands < 1:
            raise ConfigError(f"QuantConfig.n_summands must be an int >= 1, got {self.n_summands!r}")
        if self.bits is not None:
            if not isinstance(self.bits, int) or not 1 <= self.bits <= MODULUS_BITS:
                raise ConfigError(f"QuantConfig.bits must be in [1, 32], got {self.bits!r}")
            if self.n_summands * ((1 << self.bits) - 1) > _MAX_SUM:
                raise ConfigError(
                    f"QuantConfig.bits={self.bits} cannot hold a sum of n_summands="
                    f"{self.n_summands} in {MODULUS_BITS} bits; at most {max_bits(self.n_summands)} fit"
                )

    @property
    def levels(self) -> int:
        """L, the largest encoded value of one coordinate."""
        if self.bits is not None:
            return (1 << self.bits) - 1
        return _MAX_SUM // self.n_summands

    @property
    def scale(self) -> float:
        """Encoded units per unit of input."""
        return self.levels / (2.0 * self.clip)


def max_bits(n_summands: int) -> int:
    """Largest ``bits`` with n_summands * (2^bits - 1) <= 2^32 - 1."""
    if n_summands < 1:
        raise ConfigError(f"n_summands must be >= 1, got {n_summands}")
    return (_MAX_SUM // n_summands + 1).bit_length() - 1


def quantize(x: np.ndarray, cfg: QuantConfig, seed: int | np.random.SeedSequence) -> np.ndarray:
    """Encode float vector ``x`` as uint32 in [0, L] with seeded stochastic rounding.

    The seed makes encodings reproducible in tests; in production pass fresh entropy per round.
    """
    v = (np.clip(np.asarray(x, dtype=np.float64), -cfg.clip, cfg.clip) + cfg.clip) * cfg.scale
    u = np.random.default_rng(seed).random(v.shape)
    q = np.floor(v + u)
    # floor(L + u) can only exceed L through float rounding at the top edge.
    np.clip(q, 0, cfg.levels, out=q)
    return q.astype(np.uint32).reshape(-1)


def dequantize_sum(total: np.ndarray, cfg: QuantConfig, n: int) -> np.ndarray:
    """Decode the uint32 sum of ``n`` encodings back to the float sum of the clipped inputs."""
    if not 1 <= n <= cfg.n_summands:
        raise ConfigError(f"summed {n} vectors but the encoding has headroom for {cfg.n_summands}")
    return np.asarray(total, dtype=np.uint32).astype(np.float64) / cfg.scale - n * cfg.clip


def error_bound(cfg: QuantConfig, n: int) -> float:
    """Max |dequantize_sum(sum of n encodings) - sum of the clipped inputs| per coordinate.

    Stochastic rounding moves each value by less than one step (1/scale); n summands add at most
    n steps. A small relative term covers the float64 arithmetic of encode and decode.
    """
    return n / cfg.scale + 1e-9 * n * cfg.clip
