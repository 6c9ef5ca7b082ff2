"""Mask expansion: a 256-bit seed becomes a vector uniform over Z_2^32.

Why AES-256-CTR: the SecAgg proof assumes the masks come from a cryptographic PRG keyed with the
full seed. Flower folds its 32-byte seed to 32 bits and feeds numpy's MT19937, which leaves a
2^32 seed space and a non-cryptographic generator. AES-CTR keystream bytes are (computationally)
uniform, and every 4-byte little-endian word of a uniform byte string is exactly uniform over
Z_2^32, so no rejection or modular reduction is needed. It is also faster than numpy's generators
(STACK.md, "Crypto and numerics"). The keystream itself comes from ``shared._hazmat``, the one
module that imports hazmat.
"""

from __future__ import annotations

import numpy as np

from shared import _hazmat

SEED_BYTES = 32
# The keystream's counter starts at zero. That is safe because each seed keys exactly one stream
# (seeds are fresh per round and per purpose), so no (key, counter) pair ever repeats.
# Keystream is produced in slices so a mask costs O(chunk) scratch on top of its output.
_CHUNK_WORDS = 1 << 18


def _check_seed(seed: bytes) -> None:
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes, got {type(seed).__name__} "
                         f"of length {len(seed) if isinstance(seed, (bytes, bytearray)) else '?'}")


def expand(seed: bytes, dim: int) -> np.ndarray:
    """Return ``dim`` uint32 words of AES-256-CTR keystream under ``seed`` (little-endian)."""
    _check_seed(seed)
    if dim < 0:
        raise ValueError(f"dim must be >= 0, got {dim}")
    out = np.empty(dim, dtype=np.uint32)
    _fill(seed, out.view(np.uint8))
    if out.dtype.byteorder == ">":  # pragma: no cover - big-endian hosts only
        out.byteswap(inplace=True)
    return out


def _fill(seed: bytes, buf: np.ndarray) -> None:
    mv = memoryview(buf)
    start = 0
    for block in _hazmat.aes256_ctr_keystream(bytes(seed), buf.size, chunk_bytes=_CHUNK_WORDS * 4):
        mv[start:start + len(block)] = block
        start += len(block)


def add_mask(acc: np.ndarray, seed: bytes, sign: int = 1) -> None:
    """Add (``sign=+1``) or subtract (``sign=-1``) ``expand(seed, len(acc))`` into ``acc`` mod 2^32.

    In place and chunked, so regenerating n masks on the server never holds more than one
    chunk of keystream next to the accumulator (peak memory O(d), not O(n*d)).
    """
    _check_seed(seed)
    if acc.dtype != np.uint32 or acc.ndim != 1:
        raise ValueError(f"accumulator must be a 1-D uint32 array, got {acc.dtype} {acc.shape}")
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    stop = 0
    for block in _hazmat.aes256_ctr_keystream(bytes(seed), acc.size * 4, chunk_bytes=_CHUNK_WORDS * 4):
        words = np.frombuffer(block, dtype="<u4")
        start, stop = stop, stop + words.size
        if sign > 0:
            np.add(acc[start:stop], words, out=acc[start:stop], casting="unsafe")
        else:
            np.subtract(acc[start:stop], words, out=acc[start:stop], casting="unsafe")
