"""Shamir t-of-n secret sharing of 256-bit secrets over a prime field.

Why this field: the secrets are 32-byte PRG seeds and X25519 private keys, so the field must hold
every 256-bit integer. P = 2^256 + 297 is the smallest prime above 2^256; it keeps each share
value at 33 bytes (Flower splits secrets into 16-byte chunks over GF(2^128); 2^521-1 would cost
66 bytes a share). Evaluation points are ``node_id + 1`` so a share names its holder and x=0,
where the secret sits, is never handed out.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from shared.errors import ProtocolError

PRIME = (1 << 256) + 297
SECRET_BYTES = 32
_Y_BYTES = 33
SHARE_BYTES = 4 + _Y_BYTES  # x as uint32 BE, y as 33-byte BE


class ShareError(ProtocolError):
    """A share is malformed, duplicated, or too few shares were given to reconstruct."""


@dataclass(frozen=True)
class Share:
    """One point (x, f(x)) of the sharing polynomial; x >= 1."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        return struct.pack(">I", self.x) + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != SHARE_BYTES:
            raise ShareError(f"share must be {SHARE_BYTES} bytes, got {len(data)}")
        (x,) = struct.unpack(">I", data[:4])
        y = int.from_bytes(data[4:], "big")
        if x == 0 or y >= PRIME:
            raise ShareError(f"share out of field: x={x}, y has {y.bit_length()} bits")
        return cls(x, y)


def split(secret: bytes, xs: Sequence[int], threshold: int) -> list[Share]:
    """Share ``secret`` (32 bytes) at points ``xs``; any ``threshold`` of them reconstruct it.

    Coefficients come from ``secrets`` (the OS CSPRNG): t-1 shares of a uniformly random
    degree-(t-1) polynomial are independent of the secret, which is what makes dropouts safe.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    if len(set(xs)) != len(xs) or any(not 0 < x < 1 << 32 for x in xs):
        raise ValueError(f"share points must be distinct and in [1, 2^32): {list(xs)[:8]}")
    if len(xs) < threshold:
        raise ValueError(f"{len(xs)} share points cannot meet threshold {threshold}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        shares.append(Share(x, acc))
    return shares


def reconstruct(shares: Sequence[Share], threshold: int) -> bytes:
    """Lagrange-interpolate f(0) from the first ``threshold`` distinct shares.

    Raises ``ShareError`` when fewer than ``threshold`` distinct points are given or the result is
    not a 256-bit value (which only happens when a share was corrupted).
    """
    distinct: dict[int, int] = {}
    for s in shares:
        if s.x in distinct and distinct[s.x] != s.y:
            raise ShareError(f"two different shares for point x={s.x}")
        distinct[s.x] = s.y
    if len(distinct) < threshold:
        raise ShareError(f"need {threshold} distinct shares, got {len(distinct)}")
    pts = list(distinct.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise ShareError("reconstructed value exceeds 256 bits: a share is corrupt")
    return secret.to_bytes(SECRET_BYTES, "big")
