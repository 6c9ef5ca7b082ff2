"""Sparse codecs for adapter updates: shared index sets, error feedback, top-k and ring packing.

Two regimes. With secure aggregation every device must send the *same* coordinates, or masked
values would not line up; the aggregator picks the set (``random_k`` / ``select_indices``) and
announces it (``encode_indices``), and each device keeps what it did not send in a residual
(``project``). Without secure aggregation a device may pick its own largest coordinates
(``topk_*``). Masked values live in Z_2^32; ``pack_ring`` sends only their low bits.

Everything is pure numpy and vectorised: adapters reach ~10^7 coordinates, so no per-element
Python loops. Decoders treat their input as hostile: they raise ``ProtocolError`` subclasses,
never anything else, and allocate O(dim) at most. Indices are uint32 on the wire, so dim < 2^32.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from shared.errors import ConfigError, SchemaError, TruncatedError, VersionError

MAX_DIM = (1 << 32) - 1  # indices travel as uint32

# encode_indices: the first byte says which of the two encodings follows.
_TAG_BITMAP = 0x01
_TAG_VARINT = 0x02
_VARINT_MAX_BYTES = 5  # 5 x 7 bits cover any uint32

# topk: magic, version, dim, k, value dtype tag; then varint gaps; then k values.
_TOPK_MAGIC = b"TK"
_TOPK_VERSION = 1
_TOPK_HEADER = struct.Struct("<2sBIIB")
_TOPK_DTYPES: dict[str, tuple[int, np.dtype]] = {
    "float32": (1, np.dtype("<f4")),
    "float16": (2, np.dtype("<f2")),
}
_FLOAT16_MAX = float(np.finfo(np.float16).max)

_RING_FAST = {8: np.dtype("<u1"), 16: np.dtype("<u2"), 32: np.dtype("<u4")}
# Values per step of the generic bit packer. Unpacking to bits costs 32 bytes per value, so this
# bounds scratch to 2 MiB; a multiple of 8 so every step but the last ends on a byte boundary.
_RING_CHUNK = 1 << 16


# ---------------------------------------------------------------- argument checks (ConfigError)

def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    if not lo <= int(value) <= hi:
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return int(value)


def _check_float(name: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not lo <= float(value) <= hi:  # also rejects NaN
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return float(value)


def _check_seed(seed: object) -> int:
    return _check_int("seed", seed, 0, (1 << 128) - 1)  # PCG64 takes any non-negative int


def _as_vector(x: object, name: str) -> np.ndarray:
    """A finite 1-D float32 array (a view when ``x`` already is one)."""
    a = np.asarray(x)
    if a.ndim != 1 or a.dtype.kind not in "fiu":
        raise ConfigError(f"{name} must be a 1-D real array, got {a.dtype} {a.shape}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        # A NaN would sit in a residual or a score forever and poison every later round.
        raise ConfigError(f"{name} contains non-finite values")
    return a


def _check_index_set(idx: object, dim: int, name: str = "idx") -> np.ndarray:
    """Strictly increasing indices in [0, dim), as int64."""
    a = np.asarray(idx)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ConfigError(f"{name} must be a 1-D integer array, got {a.dtype} {a.shape}")
    a = a.astype(np.int64)
    if a.size and (a[0] < 0 or a[-1] >= dim or not (np.diff(a) > 0).all()):
        raise ConfigError(f"{name} must be strictly increasing indices in [0, {dim})")
    return a


def _top_by_score(scores: np.ndarray, k: int) -> np.ndarray:
    """Sorted int64 indices of the k largest scores; ties go to the lower index.

    argpartition alone picks arbitrarily among equal scores at the cut, which would make the set
    depend on the numpy build; so take everything above the k-th largest value, then fill up
    with the lowest-indexed coordinates equal to it.
    """
    if k == 0:
        return np.empty(0, dtype=np.int64)
    thresh = np.partition(scores, scores.size - k)[scores.size - k]
    above = np.flatnonzero(scores > thresh)
    at = np.flatnonzero(scores == thresh)[: k - above.size]
    return np.sort(np.concatenate([above, at])).astype(np.int64)


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


# ---------------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class Layout:
    """Where each named tensor sits in the flat update vector (names sorted, so order is fixed)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.names, tuple) or not isinstance(self.shapes, tuple):
            raise ConfigError("Layout.names and Layout.shapes must be tuples (the layout is hashable)")
        if len(self.names) != len(self.shapes):
            raise ConfigError(f"Layout: {len(self.names)} names but {len(self.shapes)} shapes")
        if not all(isinstance(n, str) for n in self.names):
            raise ConfigError(f"Layout.names must all be str, got {self.names!r}")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"Layout.names has duplicates: {self.names!r}")
        for name, shape in zip(self.names, self.shapes):
            if not isinstance(shape, tuple) or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape
            ):
                raise ConfigError(f"Layout.shapes[{name!r}] must be a tuple of ints >= 0, got {shape!r}")

    @property
    def dim(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @staticmethod
    def from_tensors(tensors: Mapping[str, np.ndarray]) -> Layout:
        names = tuple(sorted(tensors))
        return Layout(names, tuple(tuple(int(s) for s in np.shape(tensors[n])) for n in names))


def flatten(tensors: Mapping[str, np.ndarray], layout: Layout) -> np.ndarray:
    """Concatenate ``tensors`` in layout order into one float32 vector."""
    if set(tensors) != set(layout.names):
        missing, extra = set(layout.names) - set(tensors), set(tensors) - set(layout.names)
        raise ConfigError(f"flatten: tensors do not match layout (missing {sorted(missing)}, "
                          f"extra {sorted(extra)})")
    parts = []
    for name, shape in zip(layout.names, layout.shapes):
        a = np.asarray(tensors[name])
        if a.shape != shape:
            raise ConfigError(f"flatten: {name!r} has shape {a.shape}, layout says {shape}")
        if a.dtype.kind not in "fiu":
            raise ConfigError(f"flatten: {name!r} has non-real dtype {a.dtype}")
        parts.append(a.astype(np.float32, copy=False).ravel())
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def unflatten(vec: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """Split ``vec`` back into named float32 tensors (copies, so callers may mutate them)."""
    v = np.asarray(vec)
    if v.ndim != 1 or v.size != layout.dim:
        raise ConfigError(f"unflatten: expected a 1-D vector of {layout.dim}, got shape {v.shape}")
    out: dict[str, np.ndarray] = {}
    start = 0
    for name, shape in zip(layout.names, layout.shapes):
        size = math.prod(shape)
        out[name] = v[start:start + size].astype(np.float32, copy=True).reshape(shape)
        start += size
    return out


# -------------------------------------------------------------------------- shared index sets

def random_k(dim: int, k: int, seed: int) -> np.ndarray:
    """k distinct indices uniform over [0, dim), sorted uint32, fixed by (dim, k, seed).

    ``Generator(PCG64(seed)).choice(dim, k, replace=False)``; ``shuffle=False`` skips a shuffle
    we would undo by sorting and selects the same set. numpy promises this stream across
    platforms but not across numpy versions (a golden test pins it), which is one reason the
    aggregator sends the set itself (``encode_indices``) rather than only the seed.
    """
    dim = _check_int("dim", dim, 1, MAX_DIM)
    k = _check_int("k", k, 1, dim)
    pick = _rng(_check_seed(seed)).choice(dim, size=k, replace=False, shuffle=False)
    return np.sort(pick).astype(np.uint32)


def update_scores(scores: np.ndarray | None, aggregate_delta: np.ndarray, beta: float) -> np.ndarray:
    """``beta * scores + |aggregate_delta|`` in float32 (``scores=None`` starts from zeros).

    A decayed sum of magnitudes rather than the last aggregate alone, so one quiet round does not
    drop a coordinate that has mattered for many.
    """
    d = _as_vector(aggregate_delta, "aggregate_delta")
    beta = _check_float("beta", beta, 0.0, 1.0)
    if scores is None:
        return np.abs(d)
    s = _as_vector(scores, "scores")
    if s.shape != d.shape:
        raise ConfigError(f"scores has shape {s.shape}, aggregate_delta {d.shape}")
    return (np.float32(beta) * s + np.abs(d)).astype(np.float32, copy=False)


def select_indices(scores: np.ndarray | None, k: int, seed: int, explore: float = 0.25,
                   *, dim: int | None = None) -> np.ndarray:
    """Next round's shared index set: the top ``k - k_rand`` by score plus ``k_rand`` explorers.

    ``k_rand = round(explore * k)`` (Python's round, half to even) coordinates are drawn
    uniformly, seeded, from those outside the top. Exploration is needed because a coordinate
    not sent is zero in every aggregate, so pure top-k of the aggregate would never pick it again
    while device residuals pile up there. ``scores=None`` (first round, nothing known) gives
    ``random_k(dim, k, seed)``, and needs ``dim``. Returns exactly k sorted uint32 indices.
    Vary ``seed`` per round, or the same explorers are drawn whenever the top set repeats.
    """
    explore = _check_float("explore", explore, 0.0, 1.0)
    if scores is None:
        if dim is None:
            raise ConfigError("select_indices: dim is required when scores is None (first round)")
        return random_k(dim, k, seed)
    s = _as_vector(scores, "scores")
    n = _check_int("len(scores)", s.size, 1, MAX_DIM)
    if dim is not None and dim != n:
        raise ConfigError(f"select_indices: dim={dim!r} but scores has {n} entries")
    k = _check_int("k", k, 1, n)
    seed = _check_seed(seed)
    k_rand = int(round(explore * k))
    top = _top_by_score(s, k - k_rand)
    if k_rand == 0:
        return top.astype(np.uint32)
    pos = np.sort(_rng(seed).choice(n - top.size, size=k_rand, replace=False, shuffle=False))
    # The p-th coordinate outside `top` is p plus the number of top coordinates at or before it;
    # top[i] - i counts the non-top coordinates below top[i]. Avoids an O(dim) complement array.
    picks = pos + np.searchsorted(top - np.arange(top.size), pos, side="right")
    return np.sort(np.concatenate([top, picks])).astype(np.uint32)


# ---------------------------------------------------------------------------- index encoding

def _varint_lengths(v: np.ndarray) -> np.ndarray:
    nb = np.ones(v.shape, dtype=np.int64)
    for j in range(1, _VARINT_MAX_BYTES):
        nb += v >= (1 << (7 * j))
    return nb


def _varint_encode(v: np.ndarray) -> bytes:
    """LEB128 of each uint64 < 2^32, vectorised by byte position rather than by value."""
    v = v.astype(np.uint64, copy=False)
    nb = _varint_lengths(v)
    starts = np.cumsum(nb) - nb
    out = np.empty(int(nb.sum()), dtype=np.uint8)
    for j in range(_VARINT_MAX_BYTES):
        sel = nb > j
        if not sel.any():
            break
        group = (v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (nb[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (group | more).astype(np.uint8)
    return out.tobytes()


def _varint_decode(buf: np.ndarray, max_count: int, what: str) -> np.ndarray:
    """Every varint in ``buf`` (uint8) as uint64. Canonical form only: one value, one encoding."""
    if buf.size == 0:
        return np.empty(0, dtype=np.uint64)
    last = buf < 0x80
    if not last[-1]:
        raise TruncatedError(f"{what}: ends inside a varint")
    ends = np.flatnonzero(last)
    if ends.size > max_count:
        raise SchemaError(f"{what}: more than {max_count} varints")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lens = ends - starts + 1
    if lens.max() > _VARINT_MAX_BYTES:
        raise SchemaError(f"{what}: varint longer than {_VARINT_MAX_BYTES} bytes")
    if ((lens > 1) & (buf[ends] == 0)).any():
        raise SchemaError(f"{what}: non-canonical varint (trailing zero group)")
    vals = np.zeros(ends.size, dtype=np.uint64)
    for j in range(int(lens.max())):
        sel = lens > j
        vals[sel] |= (buf[starts[sel] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    return vals


def _gaps(idx: np.ndarray) -> np.ndarray:
    """First index, then (difference - 1): strictly increasing sets only, so no value is wasted."""
    g = np.empty(idx.size, dtype=np.uint64)
    if idx.size:
        g[0] = idx[0]
        g[1:] = np.diff(idx) - 1
    return g


def _ungap(gaps: np.ndarray, dim: int, what: str) -> np.ndarray:
    if gaps.size and gaps.max() >= dim:  # also keeps the cumulative sum below 2^64
        raise SchemaError(f"{what}: index out of range for dim {dim}")
    idx = np.cumsum(gaps + np.uint64(1)) - np.uint64(1)
    if idx.size and idx[-1] >= dim:
        raise SchemaError(f"{what}: index {int(idx[-1])} out of range for dim {dim}")
    return idx.astype(np.uint32)


def encode_indices(idx: np.ndarray, dim: int) -> bytes:
    """A sorted unique index set as the smaller of a dim-bit bitmap and varint-coded gaps.

    Layout: tag byte; bitmap: ceil(dim/8) bytes, bit i (LSB first) set iff i is in the set;
    varint: count, then the first index, then each (gap - 1). Ties go to the varint form.
    """
    dim = _check_int("dim", dim, 0, MAX_DIM)
    ix = _check_index_set(idx, dim)
    gaps = _gaps(ix)
    varint_size = 1 + int(_varint_lengths(np.array([ix.size])).sum() + _varint_lengths(gaps).sum())
    if 1 + (dim + 7) // 8 < varint_size:
        mask = np.zeros(dim, dtype=bool)
        mask[ix] = True
        return bytes([_TAG_BITMAP]) + np.packbits(mask, bitorder="little").tobytes()
    return bytes([_TAG_VARINT]) + _varint_encode(np.array([ix.size])) + _varint_encode(gaps)


def decode_indices(data: bytes, dim: int) -> np.ndarray:
    """Inverse of ``encode_indices``: sorted unique uint32 indices in [0, dim)."""
    dim = _check_int("dim", dim, 0, MAX_DIM)
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        raise TruncatedError("index set: empty payload")
    body = buf[1:]
    if buf[0] == _TAG_BITMAP:
        need = (dim + 7) // 8
        if body.size != need:
            err = TruncatedError if body.size < need else SchemaError
            raise err(f"index bitmap: {body.size} bytes, dim {dim} needs {need}")
        if dim % 8 and body[-1] >> (dim % 8):
            raise SchemaError("index bitmap: padding bits set")
        return np.flatnonzero(np.unpackbits(body, count=dim, bitorder="little")).astype(np.uint32)
    if buf[0] == _TAG_VARINT:
        if body.size > _VARINT_MAX_BYTES * (dim + 1):  # before anything is allocated from it
            raise SchemaError(f"index varints: {body.size} bytes is too long for dim {dim}")
        vals = _varint_decode(body, dim + 1, "index varints")
        if vals.size == 0:
            raise TruncatedError("index varints: missing count")
        count = int(vals[0])
        if count > dim:
            raise SchemaError(f"index varints: count {count} exceeds dim {dim}")
        if vals.size - 1 != count:
            err = TruncatedError if vals.size - 1 < count else SchemaError
            raise err(f"index varints: count says {count}, found {vals.size - 1}")
        return _ungap(vals[1:], dim, "index varints")
    raise SchemaError(f"index set: unknown format tag {int(buf[0])}")


# ------------------------------------------------------------------ error feedback (device)

def scatter(values: np.ndarray, idx: np.ndarray, dim: int) -> np.ndarray:
    """Dense float32 vector of length dim: ``values`` at ``idx``, zero elsewhere."""
    dim = _check_int("dim", dim, 0, MAX_DIM)
    ix = _check_index_set(idx, dim)
    v = np.asarray(values)
    if v.shape != ix.shape:
        raise ConfigError(f"scatter: {v.shape} values for {ix.size} indices")
    out = np.zeros(dim, dtype=np.float32)
    out[ix] = v
    return out


def project(delta: np.ndarray, residual: np.ndarray | None, idx: np.ndarray,
            clip: float) -> tuple[np.ndarray, np.ndarray]:
    """Send ``clip(acc[idx])`` where ``acc = delta + residual``; keep the rest as new residual.

    Nothing is dropped, only delayed: coordinates outside ``idx`` and whatever the clip cut off
    stay in the residual for later rounds, so ``scatter(values) + new_residual == acc``.
    ``clip`` may be ``inf`` (no clipping), e.g. when values are sent as floats.
    """
    d = _as_vector(delta, "delta")
    if residual is None:
        acc = d.copy()
    else:
        r = _as_vector(residual, "residual")
        if r.shape != d.shape:
            raise ConfigError(f"residual has shape {r.shape}, delta {d.shape}")
        acc = d + r
    ix = _check_index_set(idx, d.size)
    if _check_float("clip", clip, 0.0, math.inf) == 0.0:
        raise ConfigError("clip must be > 0 (it would send nothing), got 0")
    c = np.float32(clip)
    values = np.clip(acc[ix], -c, c).astype(np.float32, copy=False)
    acc[ix] -= values
    return values, acc


# --------------------------------------------------------------- per-device top-k (no SecAgg)

def topk_select(vec: np.ndarray, k: int) -> np.ndarray:
    """Sorted uint32 indices of the k largest ``|vec|``, ties to the lower index."""
    v = _as_vector(vec, "vec")
    k = _check_int("k", k, 1, min(v.size, MAX_DIM))
    return _top_by_score(np.abs(v), k).astype(np.uint32)


def topk_encode(vec: np.ndarray, k: int, value_dtype: str = "float16") -> bytes:
    """The k largest-magnitude coordinates of ``vec`` as header, varint gaps, values (LE).

    With float16 the sent values are rounded; for exact error feedback take them back from
    ``topk_decode`` of these bytes rather than from ``vec``.
    """
    if value_dtype not in _TOPK_DTYPES:
        raise ConfigError(f"value_dtype must be one of {sorted(_TOPK_DTYPES)}, got {value_dtype!r}")
    tag, dt = _TOPK_DTYPES[value_dtype]
    v = _as_vector(vec, "vec")
    idx = _top_by_score(np.abs(v), _check_int("k", k, 1, min(v.size, MAX_DIM)))
    vals = v[idx]
    if dt.itemsize == 2 and vals.size and np.abs(vals).max() > _FLOAT16_MAX:
        # Rounding to inf would be silent loss; the caller should pick float32 instead.
        raise ConfigError(f"topk_encode: |value| {np.abs(vals).max()} exceeds float16 range")
    header = _TOPK_HEADER.pack(_TOPK_MAGIC, _TOPK_VERSION, v.size, idx.size, tag)
    return header + _varint_encode(_gaps(idx)) + vals.astype(dt).tobytes()


def topk_decode(data: bytes, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``topk_encode``: (sorted uint32 indices, float32 values). Header dim must match."""
    dim = _check_int("dim", dim, 1, MAX_DIM)
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size < _TOPK_HEADER.size:
        raise TruncatedError(f"topk: {buf.size} bytes is shorter than the header")
    magic, version, hdim, k, tag = _TOPK_HEADER.unpack(buf[: _TOPK_HEADER.size].tobytes())
    if magic != _TOPK_MAGIC:
        raise SchemaError(f"topk: bad magic {magic!r}")
    if version != _TOPK_VERSION:
        raise VersionError(f"topk: version {version}, this build speaks {_TOPK_VERSION}")
    if hdim != dim:
        raise SchemaError(f"topk: header dim {hdim}, expected {dim}")
    if not 1 <= k <= dim:
        raise SchemaError(f"topk: k={k} not in [1, {dim}]")
    dt = next((d for t, d in _TOPK_DTYPES.values() if t == tag), None)
    if dt is None:
        raise SchemaError(f"topk: unknown value dtype tag {tag}")
    body = buf[_TOPK_HEADER.size:]
    value_bytes = k * dt.itemsize
    if body.size < value_bytes + k:  # every varint takes at least one byte
        raise TruncatedError(f"topk: {body.size} body bytes, k={k} needs at least {value_bytes + k}")
    gap_bytes = body[: body.size - value_bytes]
    if gap_bytes.size > _VARINT_MAX_BYTES * k:
        raise SchemaError("topk: index section too long")
    gaps = _varint_decode(gap_bytes, k, "topk indices")
    if gaps.size != k:
        raise TruncatedError(f"topk: {gaps.size} indices, header says {k}")
    idx = _ungap(gaps, dim, "topk indices")
    values = np.frombuffer(body[body.size - value_bytes:].tobytes(), dtype=dt).astype(np.float32)
    if not np.isfinite(values).all():
        raise SchemaError("topk: non-finite value")
    return idx, values


# --------------------------------------------------------------------------- ring packing

def ring_bytes(n: int, bits: int) -> int:
    """Bytes ``pack_ring`` produces for n values at ``bits`` bits each."""
    n = _check_int("n", n, 0, MAX_DIM)
    bits = _check_int("bits", bits, 1, 32)
    return (n * bits + 7) // 8


def pack_ring(y: np.ndarray, bits: int) -> bytes:
    """The low ``bits`` bits of each value, little-endian, bit-packed LSB first.

    Reducing mod 2^bits is a ring homomorphism from Z_2^32 (2^bits divides 2^32), so pairwise
    masks that cancel mod 2^32 still cancel in the smaller ring; the sum must fit in ``bits``.
    """
    bits = _check_int("bits", bits, 1, 32)
    a = np.asarray(y)
    if a.ndim != 1 or a.dtype.kind != "u":
        raise ConfigError(f"pack_ring: y must be a 1-D unsigned integer array, got {a.dtype} {a.shape}")
    _check_int("len(y)", a.size, 0, MAX_DIM)
    v = (a.astype(np.uint64) & np.uint64((1 << bits) - 1)).astype("<u4")
    if bits in _RING_FAST:
        return v.astype(_RING_FAST[bits]).tobytes()
    parts = []
    for start in range(0, v.size, _RING_CHUNK):
        chunk = v[start:start + _RING_CHUNK].view(np.uint8).reshape(-1, 4)
        bit_rows = np.unpackbits(chunk, axis=1, bitorder="little")[:, :bits]  # (m, bits)
        parts.append(np.packbits(bit_rows.ravel(), bitorder="little").tobytes())
    return b"".join(parts)


def unpack_ring(data: bytes, bits: int, n: int) -> np.ndarray:
    """Inverse of ``pack_ring``: n uint32 values in [0, 2^bits)."""
    need = ring_bytes(n, bits)
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size != need:
        err = TruncatedError if buf.size < need else SchemaError
        raise err(f"ring: {buf.size} bytes, {n} values at {bits} bits need {need}")
    if bits in _RING_FAST:
        return np.frombuffer(data, dtype=_RING_FAST[bits]).astype(np.uint32)
    tail = (n * bits) % 8
    if tail and buf[-1] >> tail:
        raise SchemaError("ring: padding bits set")
    out = np.empty(n, dtype=np.uint32)
    for start in range(0, n, _RING_CHUNK):
        m = min(_RING_CHUNK, n - start)
        first = start * bits // 8  # exact: _RING_CHUNK is a multiple of 8
        raw = buf[first:first + (m * bits + 7) // 8]
        rows = np.zeros((m, 32), dtype=np.uint8)
        rows[:, :bits] = np.unpackbits(raw, count=m * bits, bitorder="little").reshape(m, bits)
        out[start:start + m] = np.packbits(rows, axis=1, bitorder="little").view("<u4").ravel()
    return out
