"""Shamir t-of-n over GF(2^256 + 297)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.secagg import shamir
from shared.secagg.shamir import PRIME, Share, ShareError


def _is_probable_prime(n: int) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53]:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_field_is_prime_and_holds_256_bit_secrets() -> None:
    assert PRIME > 1 << 256 and _is_probable_prime(PRIME)


def test_known_answer_degree_zero() -> None:
    # t = 1 means the constant polynomial: every share's y is the secret itself.
    secret = bytes(range(32))
    for sh in shamir.split(secret, [1, 2, 3], 1):
        assert sh.y == int.from_bytes(secret, "big")


def test_every_t_subset_reconstructs() -> None:
    secret = b"\xff" * 32  # the largest 256-bit secret
    xs = list(range(1, 8))
    shares = shamir.split(secret, xs, 4)
    for subset in itertools.combinations(shares, 4):
        assert shamir.reconstruct(subset, 4) == secret


@settings(max_examples=30, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(2, 12), data=st.data())
def test_any_t_shares_reconstruct(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    xs = data.draw(st.lists(st.integers(1, 2**32 - 1), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, xs, t)
    picked = data.draw(st.permutations(shares))[:t]
    assert shamir.reconstruct([Share.from_bytes(s.to_bytes()) for s in picked], t) == secret


def test_t_minus_1_shares_fit_every_secret() -> None:
    """Any t-1 shares are consistent with any candidate secret: they determine nothing."""
    t, rng = 4, random.Random(7)
    real = bytes(rng.randrange(256) for _ in range(32))
    known = shamir.split(real, [1, 2, 3, 4, 5], t)[: t - 1]
    for _ in range(5):
        candidate = bytes(rng.randrange(256) for _ in range(32))
        # The unique degree-(t-1) polynomial through the t-1 known shares and (0, candidate)...
        pts = [(0, int.from_bytes(candidate, "big"))] + [(s.x, s.y) for s in known]
        x_new = 9
        y_new = 0
        for i, (xi, yi) in enumerate(pts):
            num = den = 1
            for j, (xj, _) in enumerate(pts):
                if i != j:
                    num = num * (x_new - xj) % PRIME
                    den = den * (xi - xj) % PRIME
            y_new = (y_new + yi * num * pow(den, -1, PRIME)) % PRIME
        # ...yields a valid t-th share that, with the same t-1 shares, opens to the candidate.
        assert shamir.reconstruct(known + [Share(x_new, y_new)], t) == candidate


def test_too_few_shares_raise() -> None:
    shares = shamir.split(bytes(32), [1, 2, 3], 3)
    with pytest.raises(ShareError):
        shamir.reconstruct(shares[:2], 3)
    with pytest.raises(ShareError):  # duplicates do not count twice
        shamir.reconstruct([shares[0], shares[0], shares[1]], 3)


def test_conflicting_duplicate_point_raises() -> None:
    a, b = shamir.split(bytes(32), [1, 2], 2)
    with pytest.raises(ShareError):
        shamir.reconstruct([a, Share(a.x, (a.y + 1) % PRIME), b], 2)


@pytest.mark.parametrize("raw", [b"", bytes(shamir.SHARE_BYTES - 1), bytes(shamir.SHARE_BYTES + 1),
                                 bytes(shamir.SHARE_BYTES),  # x = 0 is where the secret lives
                                 b"\x00\x00\x00\x01" + b"\xff" * 33])  # y >= PRIME
def test_malformed_share_bytes_raise(raw: bytes) -> None:
    with pytest.raises(ShareError):
        Share.from_bytes(raw)
