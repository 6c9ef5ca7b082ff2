"""AES-256-CTR mask expansion: known answer, determinism, seed sensitivity, exact uniformity."""

from __future__ import annotations

import numpy as np
import pytest

from shared.secagg import graph, prg

# 255 degrees of freedom, p = 0.001.
CHI2_CRIT_255 = 330.5


def byte_chi2(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256).astype(np.float64)
    expected = len(data) / 256.0
    return float(((counts - expected) ** 2 / expected).sum())


def test_known_answer_aes256_zero_key() -> None:
    # AES-256 of the all-zero block under the all-zero key (FIPS-197 style KAT): the first CTR block.
    assert prg.expand(bytes(32), 4).astype("<u4").tobytes() == bytes.fromhex("dc95c078a2408989ad48a21492842087")


def test_deterministic_and_prefix_stable() -> None:
    seed = bytes(range(32))
    a = prg.expand(seed, 1000)
    assert np.array_equal(a, prg.expand(seed, 1000))
    assert np.array_equal(a[:10], prg.expand(seed, 10))


def test_different_seeds_give_different_streams() -> None:
    s1 = bytes(range(32))
    s2 = bytes(range(31)) + b"\xff"
    assert not np.array_equal(prg.expand(s1, 64), prg.expand(s2, 64))


def test_seed_is_not_folded_to_32_bits() -> None:
    # Flower XOR-folds the seed to 32 bits; these two seeds fold to the same value but must differ here.
    s1 = bytes(32)
    s2 = b"\x01\x00\x00\x00" * 2 + bytes(24)
    assert not np.array_equal(prg.expand(s1, 16), prg.expand(s2, 16))


def test_add_mask_matches_expand_and_inverts() -> None:
    seed = b"k" * 32
    base = np.arange(prg._CHUNK_WORDS + 123, dtype=np.uint32)  # crosses a chunk boundary
    acc = base.copy()
    prg.add_mask(acc, seed, 1)
    assert np.array_equal(acc, base + prg.expand(seed, base.size))
    prg.add_mask(acc, seed, -1)
    assert np.array_equal(acc, base)


def test_keystream_bytes_are_uniform() -> None:
    assert byte_chi2(prg.expand(b"u" * 32, 1 << 16).tobytes()) < CHI2_CRIT_255


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33)])
def test_rejects_short_or_long_seed(bad: bytes) -> None:
    with pytest.raises(ValueError):
        prg.expand(bad, 4)


def test_graph_permutation_is_deterministic_and_uses_all_nodes() -> None:
    p = graph._permutation(50, b"g" * 32)
    assert sorted(p) == list(range(50)) and p == graph._permutation(50, b"g" * 32)
