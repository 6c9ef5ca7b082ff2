"""Sparse codecs: layouts, shared index sets, error feedback, top-k, ring packing, hostile bytes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from shared import sparse as sp
from shared.errors import ConfigError, ProtocolError, SchemaError, TruncatedError, VersionError


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------ layout

def test_layout_sorts_names_and_round_trips() -> None:
    t = {"b.lora_B": _rng().standard_normal((3, 2)), "a.lora_A": _rng(1).standard_normal((2, 5)),
         "c.scalar": np.float32(2.5) * np.ones(())}
    layout = sp.Layout.from_tensors(t)
    assert layout.names == ("a.lora_A", "b.lora_B", "c.scalar")
    assert layout.shapes == ((2, 5), (3, 2), ())
    assert layout.dim == 10 + 6 + 1
    vec = sp.flatten(t, layout)
    assert vec.dtype == np.float32 and vec.shape == (17,)
    np.testing.assert_array_equal(vec[:10], t["a.lora_A"].astype(np.float32).ravel())
    back = sp.unflatten(vec, layout)
    for name in t:
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], np.asarray(t[name], dtype=np.float32))
    back["a.lora_A"][0, 0] = 99.0  # copies: the flat vector is untouched
    assert vec[0] != 99.0


@pytest.mark.parametrize("tensors", [
    {"a": np.zeros((2, 2))},                                   # missing b
    {"a": np.zeros((2, 2)), "b": np.zeros(3), "c": np.zeros(1)},  # extra c
    {"a": np.zeros((4,)), "b": np.zeros(3)},                   # wrong shape
])
def test_flatten_rejects_mismatch(tensors: dict[str, np.ndarray]) -> None:
    layout = sp.Layout(("a", "b"), ((2, 2), (3,)))
    with pytest.raises(ConfigError):
        sp.flatten(tensors, layout)


def test_layout_and_unflatten_validate() -> None:
    with pytest.raises(ConfigError):
        sp.Layout(("a", "a"), ((1,), (1,)))
    with pytest.raises(ConfigError):
        sp.Layout(("a",), ((1,), (2,)))
    with pytest.raises(ConfigError):
        sp.Layout(["a"], [(1,)])  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        sp.Layout(("a",), ((-1,),))
    with pytest.raises(ConfigError):
        sp.unflatten(np.zeros(3), sp.Layout(("a",), ((2, 2),)))
    assert sp.flatten({}, sp.Layout((), ())).shape == (0,)


# ------------------------------------------------------------------------ shared index sets

@pytest.mark.parametrize(("dim", "k"), [(1, 1), (9, 1), (9, 9), (1000, 10), (100_000, 40_000)])
def test_random_k_is_a_sorted_unique_subset(dim: int, k: int) -> None:
    idx = sp.random_k(dim, k, seed=3)
    assert idx.dtype == np.uint32 and idx.size == k
    assert np.all(np.diff(idx.astype(np.int64)) > 0) and int(idx[-1]) < dim
    np.testing.assert_array_equal(idx, sp.random_k(dim, k, seed=3))
    if k < dim:
        assert not np.array_equal(idx, sp.random_k(dim, k, seed=4))


def test_random_k_golden() -> None:
    # Pins the numpy stream: if a numpy upgrade changes it, seeds stop reproducing old runs.
    assert sp.random_k(1000, 8, 42).tolist() == [85, 88, 431, 437, 651, 697, 769, 856]
    assert sp.random_k(10**6, 5, 7).tolist() == [578292, 625093, 684178, 897212, 944901]


@pytest.mark.parametrize(("dim", "k", "seed"), [(10, 0, 1), (10, 11, 1), (0, 1, 1), (10, 2, -1), (10, 2.0, 1)])
def test_random_k_rejects_bad_arguments(dim: int, k: int, seed: int) -> None:
    with pytest.raises(ConfigError):
        sp.random_k(dim, k, seed)


def test_update_scores_is_decayed_magnitude() -> None:
    d1 = np.array([1.0, -2.0, 0.0, 0.5], dtype=np.float32)
    d2 = np.array([-1.0, 0.0, 3.0, 0.5], dtype=np.float32)
    s = sp.update_scores(None, d1, beta=0.5)
    np.testing.assert_array_equal(s, np.abs(d1))
    s = sp.update_scores(s, d2, beta=0.5)
    assert s.dtype == np.float32
    np.testing.assert_allclose(s, [1.5, 1.0, 3.0, 0.75])
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError):
            sp.update_scores(s, d2, beta=bad)
    with pytest.raises(ConfigError):
        sp.update_scores(s[:3], d2, beta=0.5)
    with pytest.raises(ConfigError):
        sp.update_scores(s, np.array([np.nan, 0, 0, 0]), beta=0.5)


def test_select_indices_first_round_is_random_k() -> None:
    np.testing.assert_array_equal(sp.select_indices(None, 7, seed=5, dim=50), sp.random_k(50, 7, 5))
    with pytest.raises(ConfigError, match="dim"):
        sp.select_indices(None, 7, seed=5)


def test_select_indices_keeps_top_and_explores_outside_it() -> None:
    dim, k = 1000, 40
    scores = _rng(2).random(dim).astype(np.float32)
    idx = sp.select_indices(scores, k, seed=9, explore=0.25)
    assert idx.dtype == np.uint32 and idx.size == k and np.all(np.diff(idx.astype(np.int64)) > 0)
    top30 = set(np.argsort(-scores)[:30].tolist())
    chosen = set(idx.tolist())
    assert top30 <= chosen
    explorers = chosen - top30
    assert len(explorers) == 10
    # Explorers come from below the top 30; with 970 candidates almost all are below the top 40.
    assert len(explorers - set(np.argsort(-scores)[:k].tolist())) >= 8
    np.testing.assert_array_equal(idx, sp.select_indices(scores, k, seed=9, explore=0.25))
    assert not np.array_equal(idx, sp.select_indices(scores, k, seed=10, explore=0.25))


def test_select_indices_edges() -> None:
    scores = np.zeros(20, dtype=np.float32)
    scores[[3, 17]] = 1.0
    # Ties go to the lower index, so pure top-k is fully determined.
    assert sp.select_indices(scores, 5, seed=0, explore=0.0).tolist() == [0, 1, 2, 3, 17]
    assert sp.select_indices(scores, 20, seed=0).tolist() == list(range(20))
    everything_random = sp.select_indices(scores, 5, seed=1, explore=1.0)
    assert everything_random.size == 5
    one = sp.select_indices(scores, 1, seed=0)  # round(0.25) == 0: only the best
    assert one.tolist() == [3]
    with pytest.raises(ConfigError):
        sp.select_indices(scores, 21, seed=0)
    with pytest.raises(ConfigError):
        sp.select_indices(scores, 2, seed=0, explore=1.5)


def test_exploration_reaches_every_coordinate_where_pure_topk_stalls() -> None:
    """One device, a constant delta, scores fed from the aggregate (= what was sent)."""
    dim, k, rounds = 200, 40, 200
    delta = _rng(4).standard_normal(dim).astype(np.float32)

    def run(explore: float) -> tuple[np.ndarray, np.ndarray]:
        sent = np.zeros(dim, dtype=bool)
        scores: np.ndarray | None = None
        residual: np.ndarray | None = None
        for r in range(rounds):
            idx = sp.select_indices(scores, k, seed=r, explore=explore, dim=dim)
            values, residual = sp.project(delta, residual, idx, clip=float("inf"))
            sent[idx] = True
            scores = sp.update_scores(scores, sp.scatter(values, idx, dim), beta=0.9)
        assert residual is not None
        return sent, residual

    sent, _ = run(0.25)
    assert sent.all()
    # Without exploration the first random set is the only one ever sent, and the residual
    # everywhere else grows by delta every round: the failure exploration exists to prevent.
    sent, residual = run(0.0)
    assert sent.sum() == k
    np.testing.assert_allclose(residual[~sent], rounds * delta[~sent], rtol=1e-4)


# --------------------------------------------------------------------------- index encoding

@pytest.mark.parametrize(("dim", "idx"), [
    (0, []), (1, []), (1, [0]), (13, []), (13, [12]), (13, list(range(13))), (8, list(range(8))),
    (1000, [0, 999]), (1000, list(range(0, 1000, 2))), (2**32 - 1, [0, 5, 2**32 - 2]),
    (12345, "random-small"), (12345, "random-dense"),
])
def test_index_encoding_round_trips(dim: int, idx: list[int] | str) -> None:
    if idx == "random-small":
        ix = sp.random_k(dim, 17, seed=1)
    elif idx == "random-dense":
        ix = sp.random_k(dim, 9000, seed=1)
    else:
        ix = np.asarray(idx, dtype=np.uint32)
    data = sp.encode_indices(ix, dim)
    out = sp.decode_indices(data, dim)
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, ix)


def test_index_encoding_picks_the_smaller_form() -> None:
    dim = 100_000
    dense = sp.random_k(dim, 50_000, seed=0)
    data = sp.encode_indices(dense, dim)
    assert data[0] == 0x01 and len(data) == 1 + dim // 8
    sparse_ = sp.random_k(dim, 100, seed=0)
    data = sp.encode_indices(sparse_, dim)
    assert data[0] == 0x02 and len(data) < 1 + 3 * 100 + 1 < 1 + dim // 8
    # Gaps of one step cost one byte each.
    assert len(sp.encode_indices(np.arange(10), 10**6)) == 1 + 1 + 10


def test_index_encoding_known_bytes() -> None:
    # Golden bytes: tag 2, count 3, first index 472 (d8 03), then gap-1 values 38 (26), 25933 (cd ca 01).
    assert sp.encode_indices(np.array([472, 511, 26445]), 1000 * 1000).hex() == "0203d80326cdca01"
    assert sp.encode_indices(np.array([0, 2, 9]), 10).hex() == "010502"  # bitmap is 3 bytes


def test_encode_indices_rejects_bad_sets() -> None:
    for bad in ([3, 3], [4, 2], [-1], [10]):
        with pytest.raises(ConfigError):
            sp.encode_indices(np.asarray(bad), 10)
    with pytest.raises(ConfigError):
        sp.encode_indices(np.array([0.0, 1.0]), 10)


@pytest.mark.parametrize(("data", "dim", "err"), [
    (b"", 10, TruncatedError),
    (b"\x07\x00", 10, SchemaError),                # unknown tag
    (b"\x01\x05", 10, TruncatedError),             # bitmap one byte short
    (b"\x01\x05\x00\x00", 10, SchemaError),        # bitmap trailing byte
    (b"\x01\x05\x04", 10, SchemaError),            # padding bit 10 set
    (b"\x02", 10, TruncatedError),                 # no count
    (b"\x02\x02\x01", 10, TruncatedError),         # count 2, one index
    (b"\x02\x01\x01\x01", 10, SchemaError),        # trailing index
    (b"\x02\x01\x0a", 10, SchemaError),            # index 10 out of range
    (b"\x02\x02\x05\x04", 10, SchemaError),        # 5 then 10: out of range
    (b"\x02\x01\x85", 10, TruncatedError),         # varint cut off
    (b"\x02\x01\x81\x00", 10, SchemaError),        # overlong varint
    (b"\x02\x0b" + b"\x00" * 11, 10, SchemaError),  # count > dim
    (b"\x02\x01\xff\xff\xff\xff\xff\x01", 2**32 - 1, SchemaError),  # 6-byte varint
])
def test_decode_indices_rejects(data: bytes, dim: int, err: type[ProtocolError]) -> None:
    with pytest.raises(err):
        sp.decode_indices(data, dim)


# --------------------------------------------------------------------------- error feedback

def test_project_conserves_mass_exactly_without_clipping() -> None:
    dim = 1001
    delta = _rng(5).standard_normal(dim).astype(np.float32)
    residual = _rng(6).standard_normal(dim).astype(np.float32)
    idx = sp.random_k(dim, 100, seed=2)
    values, new_res = sp.project(delta, residual, idx, clip=100.0)
    assert values.dtype == np.float32 and values.shape == (100,)
    np.testing.assert_array_equal(sp.scatter(values, idx, dim) + new_res, delta + residual)
    assert np.all(new_res[idx] == 0)
    values0, res0 = sp.project(delta, None, idx, clip=100.0)
    np.testing.assert_array_equal(values0, delta[idx])
    np.testing.assert_array_equal(sp.scatter(values0, idx, dim) + res0, delta)


def test_project_keeps_clipped_mass_in_the_residual() -> None:
    delta = np.array([5.0, -0.2, -7.0, 0.3], dtype=np.float32)
    idx = np.array([0, 1, 2], dtype=np.uint32)
    values, res = sp.project(delta, None, idx, clip=1.0)
    np.testing.assert_array_equal(values, np.array([1.0, -0.2, -1.0], dtype=np.float32))
    np.testing.assert_allclose(res, [4.0, 0.0, -6.0, 0.3])
    np.testing.assert_allclose(sp.scatter(values, idx, 4) + res, delta, rtol=0, atol=1e-6)


def test_project_rejects_bad_arguments() -> None:
    d = np.ones(5, dtype=np.float32)
    with pytest.raises(ConfigError):
        sp.project(d, np.ones(4), np.array([0]), clip=1.0)
    with pytest.raises(ConfigError):
        sp.project(d, None, np.array([5]), clip=1.0)
    with pytest.raises(ConfigError):
        sp.project(d, None, np.array([0]), clip=0.0)
    with pytest.raises(ConfigError):
        sp.scatter(np.ones(2), np.array([0]), 5)


def test_random_k_error_feedback_sends_everything_and_stays_bounded() -> None:
    dim, k, rounds = 200, 20, 120
    delta = _rng(7).standard_normal(dim).astype(np.float32)
    residual: np.ndarray | None = None
    total_sent = np.zeros(dim, dtype=np.float64)
    last_sent = np.full(dim, -1)
    for r in range(rounds):
        idx = sp.random_k(dim, k, seed=1000 + r)
        values, residual = sp.project(delta, residual, idx, clip=float("inf"))
        total_sent += sp.scatter(values, idx, dim)
        last_sent[idx] = r
        # The residual is delta times the rounds since the coordinate was last sent.
        np.testing.assert_allclose(residual, (r - last_sent) * delta, rtol=1e-4, atol=1e-5)
    assert residual is not None
    assert (last_sent >= 0).all()
    np.testing.assert_allclose(total_sent + residual, rounds * delta.astype(np.float64), rtol=1e-4)
    # So it stays near the mean wait (1 - p) / p = 9 rounds instead of growing with the round count.
    assert np.mean(np.abs(residual) / np.abs(delta)) < 20


# ----------------------------------------------------------------------------- top-k codec

@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("dim", "k"), [(1, 1), (13, 1), (13, 13), (1000, 37)])
def test_topk_round_trips(dim: int, k: int, dtype: str) -> None:
    vec = _rng(dim + k).standard_normal(dim).astype(np.float32)
    data = sp.topk_encode(vec, k, value_dtype=dtype)
    idx, values = sp.topk_decode(data, dim)
    assert idx.dtype == np.uint32 and values.dtype == np.float32 and idx.size == k
    np.testing.assert_array_equal(idx, sp.topk_select(vec, k))
    expect = np.sort(np.argsort(-np.abs(vec), kind="stable")[:k])
    np.testing.assert_array_equal(idx, expect)
    np.testing.assert_array_equal(values, vec[idx].astype(dtype).astype(np.float32))


def test_topk_ties_go_to_lower_index_and_sizes_add_up() -> None:
    vec = np.array([1.0, -3.0, 3.0, 0.0, -3.0, 2.0], dtype=np.float32)
    assert sp.topk_select(vec, 2).tolist() == [1, 2]
    assert sp.topk_select(vec, 3).tolist() == [1, 2, 4]
    data = sp.topk_encode(vec, 3, value_dtype="float16")
    assert len(data) == 12 + 3 + 3 * 2  # header, three one-byte gaps, three halves


def test_topk_rejects_bad_arguments() -> None:
    vec = np.ones(10, dtype=np.float32)
    for k in (0, 11):
        with pytest.raises(ConfigError):
            sp.topk_encode(vec, k)
    with pytest.raises(ConfigError):
        sp.topk_encode(vec, 2, value_dtype="bfloat16")
    with pytest.raises(ConfigError):
        sp.topk_encode(vec * 1e6, 2, value_dtype="float16")  # would round to inf
    sp.topk_encode(vec * 1e6, 2, value_dtype="float32")


def test_topk_decode_rejects_headers_and_values() -> None:
    vec = _rng(8).standard_normal(50).astype(np.float32)
    good = sp.topk_encode(vec, 5, value_dtype="float32")
    sp.topk_decode(good, 50)
    with pytest.raises(SchemaError, match="dim"):
        sp.topk_decode(good, 51)
    cases: list[tuple[Callable[[bytearray], None], type[ProtocolError]]] = [
        (lambda b: b.__setitem__(0, ord("X")), SchemaError),       # magic
        (lambda b: b.__setitem__(2, 9), VersionError),             # version
        (lambda b: b.__setitem__(11, 7), SchemaError),             # dtype tag
        (lambda b: b.__setitem__(7, 0), SchemaError),              # k = 0
        (lambda b: b.__setitem__(7, 49), TruncatedError),          # k = 49 > bytes present
        (lambda b: b.__setitem__(slice(-4, None), np.float32(np.inf).tobytes()), SchemaError),
        (lambda b: b.__delitem__(slice(-1, None)), ProtocolError),
        (lambda b: b.extend(b"\x00"), ProtocolError),
    ]
    for mutate, err in cases:
        b = bytearray(good)
        mutate(b)
        with pytest.raises(err):
            sp.topk_decode(bytes(b), 50)


# ---------------------------------------------------------------------------- ring packing

@pytest.mark.parametrize("bits", list(range(1, 33)))
@pytest.mark.parametrize("n", [0, 1, 7, 1001])
def test_ring_round_trips(bits: int, n: int) -> None:
    y = _rng(bits * 1000 + n).integers(0, 2**32, size=n, dtype=np.uint32)
    data = sp.pack_ring(y, bits)
    assert len(data) == sp.ring_bytes(n, bits) == (n * bits + 7) // 8
    out = sp.unpack_ring(data, bits, n)
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, y & np.uint32((1 << bits) - 1) if bits < 32 else y)


def test_ring_packs_across_chunk_boundaries() -> None:
    n = 2 * sp._RING_CHUNK + 5  # the generic packer works in chunks; cross two seams
    y = _rng(11).integers(0, 2**32, size=n, dtype=np.uint32)
    np.testing.assert_array_equal(sp.unpack_ring(sp.pack_ring(y, 13), 13, n), y & np.uint32(2**13 - 1))


def test_ring_size() -> None:
    assert len(sp.pack_ring(np.arange(1000, dtype=np.uint32), 12)) == 1500
    assert sp.ring_bytes(3, 12) == 5


@pytest.mark.parametrize("bits", [8, 12, 16, 32])
def test_ring_reduction_is_a_homomorphism(bits: int) -> None:
    mod = 1 << bits
    rng = _rng(bits)
    n_dev, dim = 5, 257
    x = rng.integers(0, mod // n_dev, size=(n_dev, dim), dtype=np.uint32)  # so the sum fits
    # Pairwise masks m_ij = -m_ji: they cancel in the sum mod 2^32.
    masks = np.zeros((n_dev, dim), dtype=np.uint32)
    for i in range(n_dev):
        for j in range(i + 1, n_dev):
            m = rng.integers(0, 2**32, size=dim, dtype=np.uint32)
            masks[i] += m
            masks[j] -= m
    assert np.all(masks.sum(axis=0, dtype=np.uint32) == 0)
    y = x + masks  # wraps mod 2^32
    received = [sp.unpack_ring(sp.pack_ring(y[i], bits), bits, dim) for i in range(n_dev)]
    total = np.sum([r.astype(np.uint64) for r in received], axis=0) % mod
    np.testing.assert_array_equal(total, y.astype(np.uint64).sum(axis=0) % mod)
    np.testing.assert_array_equal(total, x.astype(np.uint64).sum(axis=0) % mod)  # masks gone
    np.testing.assert_array_equal(total, x.astype(np.uint64).sum(axis=0))  # and it fit


def test_ring_rejects() -> None:
    with pytest.raises(TruncatedError):
        sp.unpack_ring(b"\x00" * 4, 12, 3)
    with pytest.raises(SchemaError):
        sp.unpack_ring(b"\x00" * 6, 12, 3)
    with pytest.raises(SchemaError, match="padding"):
        sp.unpack_ring(b"\x00\x00\x00\x00\xf0", 12, 3)  # 36 bits used, bits 36..39 set
    for bad_bits in (0, 33):
        with pytest.raises(ConfigError):
            sp.pack_ring(np.zeros(3, dtype=np.uint32), bad_bits)
    with pytest.raises(ConfigError):
        sp.pack_ring(np.zeros(3, dtype=np.int32), 12)
    # Wider unsigned inputs reduce the same way.
    big = np.array([2**40 + 5], dtype=np.uint64)
    assert sp.unpack_ring(sp.pack_ring(big, 12), 12, 1).tolist() == [5]


# ----------------------------------------------------------------------- hostile-bytes fuzz

def _mutations(good: bytes, rng: np.random.Generator, count: int) -> list[bytes]:
    out = [good[:cut] for cut in range(len(good))]  # every truncation
    for _ in range(count):
        b = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(len(b)))] ^= int(rng.integers(1, 256))
        if rng.random() < 0.2:
            b += bytes(rng.integers(0, 256, size=int(rng.integers(1, 4)), dtype=np.uint8))
        out.append(bytes(b))
    return out


def _decoded_or_rejected(decode: Callable[[bytes], object], data: bytes) -> object | None:
    try:
        return decode(data)
    except ProtocolError:
        return None  # anything else (IndexError, ValueError, ...) escapes and fails the test


@pytest.mark.parametrize("dim", [13, 3000])
def test_fuzz_decode_indices(dim: int) -> None:
    rng = _rng(dim)
    for k in (1, 5, dim // 2, dim):
        good = sp.encode_indices(sp.random_k(dim, k, seed=k), dim)
        for data in _mutations(good, rng, 150):
            out = _decoded_or_rejected(lambda d: sp.decode_indices(d, dim), data)
            if out is not None:
                assert isinstance(out, np.ndarray) and out.dtype == np.uint32
                assert out.size == 0 or (int(out[-1]) < dim and np.all(np.diff(out.astype(np.int64)) > 0))


def test_fuzz_topk_decode() -> None:
    rng = _rng(1)
    dim = 500
    for k, dtype in ((1, "float16"), (20, "float32"), (500, "float16")):
        good = sp.topk_encode(rng.standard_normal(dim).astype(np.float32), k, dtype)
        for data in _mutations(good, rng, 150):
            out = _decoded_or_rejected(lambda d: sp.topk_decode(d, dim), data)
            if out is not None:
                idx, values = out  # type: ignore[misc]
                assert idx.size == values.size == k and int(idx[-1]) < dim
                assert np.all(np.diff(idx.astype(np.int64)) > 0) and np.isfinite(values).all()


@pytest.mark.parametrize("bits", [5, 8, 12, 16, 32])
def test_fuzz_unpack_ring(bits: int) -> None:
    rng = _rng(bits)
    n = 37
    good = sp.pack_ring(rng.integers(0, 2**32, size=n, dtype=np.uint32), bits)
    for data in _mutations(good, rng, 100):
        out = _decoded_or_rejected(lambda d: sp.unpack_ring(d, bits, n), data)
        if out is not None:
            assert isinstance(out, np.ndarray) and out.size == n and int(out.max()) < (1 << bits)
