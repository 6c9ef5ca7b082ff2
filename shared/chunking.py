"""Chunked transfers: split a payload under a broker's message-size limit, reassemble it safely,
and let a restarted sender resume. Pure code: no networking, no threads, no clocks it does not
get told about.

- ``split`` makes a ``Manifest`` (transfer id, total size, chunk size, count, SHA-256 of the whole
  payload, optional per-chunk SHA-256s) and ``iter_chunks`` yields ``Chunk`` frames
  ``(xfer_id, seq, data)``. Both encode to strict msgpack arrays: a tag, a frame version, then
  fixed positional fields; decoding rejects anything else with ``TruncatedError`` or
  ``SchemaError``.
- ``Reassembler`` is bounded in memory (concurrent transfers, transfers per sender, bytes per
  transfer, total bytes, chunk count; a manifest's ``total_size`` counts against the budget from
  the start, but memory is only taken as chunks arrive, so a manifest alone costs nothing) and in
  time (``expire(now)`` drops transfers idle past a timeout; repeating a manifest does not count
  as activity). It is idempotent on ``(xfer_id, seq)``, checks per-chunk
  digests as chunks arrive when the manifest has them, verifies the whole SHA-256 at the end and
  reports ``missing(xfer_id)``. Transfers are keyed by ``(sender, xfer_id)``: pass the device id
  taken from the topic so one device can never touch another's transfer.
- ``UploadJournal`` persists, per transfer, the manifest and the acknowledged sequence numbers in
  a small JSON file, so a device that restarts mid-upload sends only what is not done
  (``plan_upload``).

Integrity here is against corruption and mix-ups; authenticity comes from sealing the payload
(``shared.crypto``) before splitting it, or from signing the manifest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from shared.errors import ProtocolError, SchemaError, TruncatedError

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "AWS_IOT_MAX_MESSAGE_BYTES",
    "ChunkPolicy",
    "Manifest",
    "Chunk",
    "TransferRejected",
    "IntegrityError",
    "decode_frame",
    "new_xfer_id",
    "split",
    "iter_chunks",
    "needs_chunking",
    "Reassembler",
    "UploadJournal",
    "plan_upload",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
# AWS IoT Core caps MQTT payloads at 128 KB; stay well under it (ALGORITHMS.md D5: <= 120 KB).
AWS_IOT_MAX_MESSAGE_BYTES = 120 * 1024

MANIFEST_TAG = "flm.xfer.manifest"
CHUNK_TAG = "flm.xfer.chunk"
FRAME_VERSION = 1
SHA256_LEN = 32
XFER_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_CHUNK_SIZE = 64 * 1024 * 1024
MAX_SEQ = 2**32 - 1
# Bytes a Chunk frame adds around its data, at most: array header 1, tag 1+17, version 1,
# xfer id 2+64, seq 5, bin header 5 = 96. Rounded up.
CHUNK_FRAME_OVERHEAD = 128

_UNPACK_LIMITS = dict(
    raw=False,
    use_list=False,
    strict_map_key=True,
    max_map_len=0,  # no maps on this wire: fields are positional
    max_ext_len=0,
    max_str_len=256,
    max_array_len=1 << 20,
    max_bin_len=MAX_CHUNK_SIZE,
)


class TransferRejected(ProtocolError):
    """A transfer or chunk is refused: over a bound, unknown, expired, or conflicting."""


class IntegrityError(ProtocolError):
    """A chunk or the reassembled payload does not match its SHA-256, or a duplicate differs."""


# --- policy ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkPolicy:
    """How big one MQTT message may be. ``reserve`` leaves room for the topic, MQTT properties
    and any envelope the caller adds around a frame."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    reserve: int = 1024
    per_chunk_digests: bool = True

    def __post_init__(self) -> None:
        if self.max_message_bytes - self.reserve - CHUNK_FRAME_OVERHEAD < 1:
            raise ValueError(f"max_message_bytes {self.max_message_bytes} leaves no room for data")
        if self.chunk_size > MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size {self.chunk_size} exceeds {MAX_CHUNK_SIZE}")

    @property
    def chunk_size(self) -> int:
        return self.max_message_bytes - self.reserve - CHUNK_FRAME_OVERHEAD

    @classmethod
    def aws_iot(cls) -> ChunkPolicy:
        return cls(max_message_bytes=AWS_IOT_MAX_MESSAGE_BYTES)


# --- frames ----------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise SchemaError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")


def _check_digest(name: str, value: Any) -> None:
    if not isinstance(value, bytes) or len(value) != SHA256_LEN:
        raise SchemaError(f"{name} must be {SHA256_LEN} bytes")


def _check_xfer_id(value: Any) -> None:
    if not isinstance(value, str) or not XFER_ID_RE.match(value):
        raise SchemaError(f"xfer_id {value!r} must be 1-64 characters from A-Z a-z 0-9 _ -")


@dataclass(frozen=True)
class Manifest:
    """What a transfer will deliver. Sent before its chunks."""

    xfer_id: str
    total_size: int
    chunk_size: int
    count: int
    sha256: bytes
    chunk_sha256: tuple[bytes, ...] | None = None

    def __post_init__(self) -> None:
        _check_xfer_id(self.xfer_id)
        _check_int("total_size", self.total_size, 1, 2**63 - 1)
        _check_int("chunk_size", self.chunk_size, 1, MAX_CHUNK_SIZE)
        _check_int("count", self.count, 1, MAX_SEQ + 1)
        if self.count != math.ceil(self.total_size / self.chunk_size):
            raise SchemaError(
                f"count {self.count} != ceil(total_size {self.total_size} / chunk_size {self.chunk_size})"
            )
        _check_digest("sha256", self.sha256)
        if self.chunk_sha256 is not None:
            if not isinstance(self.chunk_sha256, tuple) or len(self.chunk_sha256) != self.count:
                raise SchemaError(f"chunk_sha256 must be a tuple of {self.count} digests")
            for d in self.chunk_sha256:
                _check_digest("chunk_sha256[i]", d)

    def chunk_length(self, seq: int) -> int:
        """Exact data length of chunk ``seq``: ``chunk_size`` except for the last."""
        if seq < self.count - 1:
            return self.chunk_size
        return self.total_size - (self.count - 1) * self.chunk_size

    def encode(self) -> bytes:
        return msgpack.packb(
            [
                MANIFEST_TAG,
                FRAME_VERSION,
                self.xfer_id,
                self.total_size,
                self.chunk_size,
                self.count,
                self.sha256,
                list(self.chunk_sha256) if self.chunk_sha256 is not None else None,
            ],
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        frame = decode_frame(data)
        if not isinstance(frame, Manifest):
            raise SchemaError(f"expected a manifest, got {type(frame).__name__}")
        return frame


@dataclass(frozen=True)
class Chunk:
    """One piece of a transfer: ``data`` is bytes ``seq * chunk_size`` onwards."""

    xfer_id: str
    seq: int
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_xfer_id(self.xfer_id)
        _check_int("seq", self.seq, 0, MAX_SEQ)
        if not isinstance(self.data, bytes) or not 1 <= len(self.data) <= MAX_CHUNK_SIZE:
            raise SchemaError(f"chunk data must be 1..{MAX_CHUNK_SIZE} bytes")

    def encode(self) -> bytes:
        return msgpack.packb([CHUNK_TAG, FRAME_VERSION, self.xfer_id, self.seq, self.data], use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> Chunk:
        frame = decode_frame(data)
        if not isinstance(frame, Chunk):
            raise SchemaError(f"expected a chunk, got {type(frame).__name__}")
        return frame


def decode_frame(data: bytes) -> Manifest | Chunk:
    """Decode a manifest or chunk frame; ``TruncatedError`` if it ends early, ``SchemaError``
    for anything else that is not exactly one well-formed frame."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SchemaError(f"frame must be bytes, got {type(data).__name__}")
    data = bytes(data)
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1), **_UNPACK_LIMITS)
    unpacker.feed(data)
    try:
        obj = unpacker.unpack()
    except msgpack.OutOfData:
        raise TruncatedError(f"frame of {len(data)} bytes ends early") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SchemaError(f"frame is not valid msgpack for this schema: {exc}") from None
    if unpacker.tell() != len(data):
        raise SchemaError(f"{len(data) - unpacker.tell()} trailing bytes after the frame")
    if not isinstance(obj, tuple) or len(obj) < 2:
        raise SchemaError("frame must be an array [tag, version, ...]")
    tag, version = obj[0], obj[1]
    if tag == MANIFEST_TAG:
        expected = 8
    elif tag == CHUNK_TAG:
        expected = 5
    else:
        raise SchemaError(f"unknown frame tag {tag!r}")
    if version != FRAME_VERSION or isinstance(version, bool):
        raise SchemaError(f"{tag} version {version!r} is not {FRAME_VERSION}")
    if len(obj) != expected:
        raise SchemaError(f"{tag} must have {expected} fields, got {len(obj)}")
    if tag == MANIFEST_TAG:
        _, _, xfer_id, total, csize, count, digest, chunk_digests = obj
        if chunk_digests is not None and not isinstance(chunk_digests, tuple):
            raise SchemaError("chunk_sha256 must be an array or nil")
        return Manifest(xfer_id, total, csize, count, digest, chunk_digests)
    _, _, xfer_id, seq, payload = obj
    return Chunk(xfer_id, seq, payload)


# --- sender side -----------------------------------------------------------------------------------


def new_xfer_id() -> str:
    return secrets.token_hex(16)


def needs_chunking(payload_len: int, policy: ChunkPolicy = ChunkPolicy()) -> bool:
    """Whether a payload of this size must go as a chunked transfer rather than one message."""
    return payload_len > policy.max_message_bytes - policy.reserve


def split(payload: bytes, policy: ChunkPolicy = ChunkPolicy(), *, xfer_id: str | None = None) -> Manifest:
    """Build the manifest for ``payload``; get the frames with ``iter_chunks``."""
    view = memoryview(payload)
    if len(view) == 0:
        raise ValueError("nothing to transfer: the payload is empty")
    size = policy.chunk_size
    count = math.ceil(len(view) / size)
    digests = (
        tuple(hashlib.sha256(view[i * size : (i + 1) * size]).digest() for i in range(count))
        if policy.per_chunk_digests
        else None
    )
    manifest = Manifest(
        xfer_id=xfer_id or new_xfer_id(),
        total_size=len(view),
        chunk_size=size,
        count=count,
        sha256=hashlib.sha256(view).digest(),
        chunk_sha256=digests,
    )
    encoded = len(manifest.encode())
    if encoded > policy.max_message_bytes - policy.reserve:
        raise ValueError(
            f"the manifest for {len(view)} bytes is {encoded} bytes, over the message limit; "
            "use a larger chunk size, per_chunk_digests=False, or out-of-band transfer"
        )
    return manifest


def iter_chunks(payload: bytes, manifest: Manifest, seqs: Iterable[int] | None = None) -> Iterator[Chunk]:
    """Yield the chunks of ``payload`` (all, or only ``seqs``) described by ``manifest``."""
    view = memoryview(payload)
    if len(view) != manifest.total_size:
        raise ValueError(f"payload is {len(view)} bytes, the manifest says {manifest.total_size}")
    for seq in range(manifest.count) if seqs is None else seqs:
        if not 0 <= seq < manifest.count:
            raise ValueError(f"seq {seq} outside 0..{manifest.count - 1}")
        start = seq * manifest.chunk_size
        yield Chunk(manifest.xfer_id, seq, bytes(view[start : start + manifest.chunk_length(seq)]))


# --- receiver side ---------------------------------------------------------------------------------


@dataclass
class _Transfer:
    manifest: Manifest
    parts: dict[int, bytes]  # seq -> data, filled as chunks arrive (nothing allocated up front)
    received: int
    last_activity: float

    def has(self, seq: int) -> bool:
        return seq in self.parts


class Reassembler:
    """Bounded, idempotent reassembly of chunked transfers (see the module docstring).

    Call ``start`` with the manifest, then ``add`` each chunk; ``add`` returns the payload once
    the last chunk arrives and the whole SHA-256 matches. Chunks for a transfer that has not
    started (or was dropped) raise ``TransferRejected``; the sender should re-send the manifest.
    """

    def __init__(
        self,
        *,
        max_transfers: int = 64,
        max_transfer_bytes: int = 256 * 1024 * 1024,
        max_total_bytes: int = 1024 * 1024 * 1024,
        max_chunks: int = 1 << 16,
        idle_timeout_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        remember_completed: int = 1024,
        max_per_sender: int | None = None,
    ) -> None:
        self.max_transfers = max_transfers
        # One sender may hold this many transfers; a new manifest beyond it replaces the sender's
        # oldest transfer, so a sender can only ever crowd out itself.
        self.max_per_sender = max_per_sender
        self.max_transfer_bytes = max_transfer_bytes
        self.max_total_bytes = max_total_bytes
        self.max_chunks = max_chunks
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._transfers: dict[tuple[str, str], _Transfer] = {}
        # Recently finished transfers, so late duplicates are ignored rather than rejected.
        self._completed: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._remember = remember_completed
        self._reserved = 0

    # -- introspection
    @property
    def active_transfers(self) -> int:
        return len(self._transfers)

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    def is_complete(self, xfer_id: str, *, sender: str = "") -> bool:
        return (sender, xfer_id) in self._completed

    def missing(self, xfer_id: str, *, sender: str = "") -> list[int]:
        """Sequence numbers not yet received (empty once complete). ``TransferRejected`` if the
        transfer is unknown (never started, dropped or expired)."""
        if (sender, xfer_id) in self._completed:
            return []
        t = self._get(sender, xfer_id)
        return [i for i in range(t.manifest.count) if not t.has(i)]

    # -- lifecycle
    def start(self, manifest: Manifest, *, sender: str = "", now: float | None = None) -> bool:
        """Accept a transfer. Returns True if new, False for a repeat of a known manifest."""
        now = self._clock() if now is None else now
        key = (sender, manifest.xfer_id)
        if key in self._completed:
            if self._completed[key] != manifest.sha256:
                raise TransferRejected(f"transfer {manifest.xfer_id} already completed with another digest")
            return False
        existing = self._transfers.get(key)
        if existing is not None:
            if existing.manifest != manifest:
                raise TransferRejected(f"transfer {manifest.xfer_id} is in progress with a different manifest")
            return False  # a repeat is not activity: it must not keep a stalled transfer alive
        if manifest.total_size > self.max_transfer_bytes:
            raise TransferRejected(
                f"transfer {manifest.xfer_id} of {manifest.total_size} bytes exceeds the "
                f"{self.max_transfer_bytes}-byte limit per transfer"
            )
        if manifest.count > self.max_chunks:
            raise TransferRejected(f"transfer {manifest.xfer_id} has {manifest.count} chunks, over {self.max_chunks}")
        self.expire(now)  # make room from idle transfers before refusing a new one
        if self.max_per_sender is not None:
            mine = sorted((t.last_activity, k) for k, t in self._transfers.items() if k[0] == sender)
            for _, old in mine[: max(0, len(mine) - self.max_per_sender + 1)]:
                log.info("transfer %s/%s replaced by a newer one from the same sender", old[0], old[1])
                self._forget(old)
        if len(self._transfers) >= self.max_transfers:
            raise TransferRejected(f"already {len(self._transfers)} transfers in progress (limit {self.max_transfers})")
        if self._reserved + manifest.total_size > self.max_total_bytes:
            raise TransferRejected(
                f"accepting {manifest.total_size} bytes would exceed the {self.max_total_bytes}-byte "
                f"reassembly budget ({self._reserved} in use)"
            )
        self._transfers[key] = _Transfer(manifest, {}, 0, now)
        self._reserved += manifest.total_size
        log.debug("transfer %s/%s started: %d bytes in %d chunks", sender, manifest.xfer_id, manifest.total_size, manifest.count)
        return True

    def add(self, chunk: Chunk, *, sender: str = "", now: float | None = None) -> bytes | None:
        """Store one chunk. Returns the whole payload when this chunk completes it, else None.

        Repeats of a stored chunk are ignored (an identical repeat) or rejected with
        ``IntegrityError`` (different bytes). A chunk whose per-chunk digest fails is not stored,
        so a good retransmission can still complete the transfer.
        """
        now = self._clock() if now is None else now
        key = (sender, chunk.xfer_id)
        if key in self._completed:
            return None  # late duplicate of a finished transfer
        t = self._get(sender, chunk.xfer_id)
        m = t.manifest
        if chunk.seq >= m.count:
            raise SchemaError(f"chunk seq {chunk.seq} outside 0..{m.count - 1} of transfer {m.xfer_id}")
        if len(chunk.data) != m.chunk_length(chunk.seq):
            raise SchemaError(
                f"chunk {chunk.seq} of {m.xfer_id} has {len(chunk.data)} bytes, expected {m.chunk_length(chunk.seq)}"
            )
        if t.has(chunk.seq):
            if t.parts[chunk.seq] != chunk.data:
                raise IntegrityError(f"chunk {chunk.seq} of {m.xfer_id} repeated with different bytes")
            t.last_activity = now
            return None
        if m.chunk_sha256 is not None and hashlib.sha256(chunk.data).digest() != m.chunk_sha256[chunk.seq]:
            raise IntegrityError(f"chunk {chunk.seq} of {m.xfer_id} does not match its SHA-256")
        t.parts[chunk.seq] = bytes(chunk.data)
        t.received += 1
        t.last_activity = now
        if t.received < m.count:
            return None
        self._forget(key)
        payload = b"".join(t.parts[i] for i in range(m.count))
        if hashlib.sha256(payload).digest() != m.sha256:
            raise IntegrityError(f"transfer {m.xfer_id} reassembled to a payload whose SHA-256 does not match")
        self._completed[key] = m.sha256
        while len(self._completed) > self._remember:
            self._completed.popitem(last=False)
        log.debug("transfer %s/%s complete", sender, m.xfer_id)
        return payload

    def expire(self, now: float | None = None) -> list[tuple[str, str]]:
        """Drop transfers idle for longer than ``idle_timeout_s``; return their (sender, xfer_id)."""
        now = self._clock() if now is None else now
        stale = [k for k, t in self._transfers.items() if now - t.last_activity > self.idle_timeout_s]
        for key in stale:
            t = self._transfers[key]
            log.info(
                "dropping idle transfer %s/%s (%d of %d chunks after %.0f s)",
                key[0], key[1], t.received, t.manifest.count, now - t.last_activity,
            )
            self._forget(key)
        return stale

    def drop(self, xfer_id: str, *, sender: str = "") -> bool:
        key = (sender, xfer_id)
        if key not in self._transfers:
            return False
        self._forget(key)
        return True

    def _get(self, sender: str, xfer_id: str) -> _Transfer:
        t = self._transfers.get((sender, xfer_id))
        if t is None:
            raise TransferRejected(f"no transfer {xfer_id!r} in progress from {sender!r} (send its manifest)")
        return t

    def _forget(self, key: tuple[str, str]) -> None:
        t = self._transfers.pop(key)
        self._reserved -= t.manifest.total_size


# --- sender journal --------------------------------------------------------------------------------

_JOURNAL_FORMAT = "flm-upload-journal"
_JOURNAL_VERSION = 1


class UploadJournal:
    """Which chunks of which transfers were acknowledged, one small JSON file per transfer in
    ``directory``, rewritten atomically on each update so a crash leaves the old or new state."""

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._cache: dict[str, tuple[Manifest, set[int]]] = {}

    def _path(self, xfer_id: str) -> Path:
        _check_xfer_id(xfer_id)  # also keeps the file name inside the directory
        return self.directory / f"{xfer_id}.json"

    def _save(self, manifest: Manifest, acked: set[int]) -> None:
        path = self._path(manifest.xfer_id)
        text = json.dumps(
            {
                "format": _JOURNAL_FORMAT,
                "version": _JOURNAL_VERSION,
                "manifest": base64.b64encode(manifest.encode()).decode(),
                "acked": sorted(acked),
            }
        )
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
            if self._fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _load(self, xfer_id: str) -> tuple[Manifest, set[int]]:
        if xfer_id in self._cache:
            return self._cache[xfer_id]
        path = self._path(xfer_id)
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise KeyError(f"no journal entry for transfer {xfer_id!r}") from None
        except ValueError as exc:
            raise SchemaError(f"journal {path} is not JSON: {exc}") from None
        if not isinstance(obj, dict) or set(obj) != {"format", "version", "manifest", "acked"}:
            raise SchemaError(f"journal {path} does not have the expected fields")
        if obj["format"] != _JOURNAL_FORMAT or obj["version"] != _JOURNAL_VERSION:
            raise SchemaError(f"journal {path} is not a {_JOURNAL_FORMAT} v{_JOURNAL_VERSION} file")
        try:
            manifest = Manifest.decode(base64.b64decode(obj["manifest"], validate=True))
        except (binascii.Error, TypeError, ValueError) as exc:
            raise SchemaError(f"journal {path}: bad manifest: {exc}") from None
        acked = obj["acked"]
        if (
            manifest.xfer_id != xfer_id
            or not isinstance(acked, list)
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < manifest.count for s in acked)
        ):
            raise SchemaError(f"journal {path} is inconsistent")
        entry = (manifest, set(acked))
        self._cache[xfer_id] = entry
        return entry

    def begin(self, manifest: Manifest) -> frozenset[int]:
        """Record a transfer (if new) and return the seqs already acknowledged (empty if new)."""
        try:
            known, acked = self._load(manifest.xfer_id)
        except KeyError:
            self._cache[manifest.xfer_id] = (manifest, set())
            self._save(manifest, set())
            return frozenset()
        if known != manifest:
            raise ValueError(f"transfer {manifest.xfer_id} is journaled with a different manifest")
        return frozenset(acked)

    def mark_acked(self, xfer_id: str, seqs: int | Iterable[int]) -> None:
        manifest, acked = self._load(xfer_id)
        new = {seqs} if isinstance(seqs, int) else set(seqs)
        bad = [s for s in new if not 0 <= s < manifest.count]
        if bad:
            raise ValueError(f"seqs {bad} outside 0..{manifest.count - 1}")
        if not new <= acked:
            acked |= new
            self._save(manifest, acked)

    def manifest(self, xfer_id: str) -> Manifest:
        return self._load(xfer_id)[0]

    def acked(self, xfer_id: str) -> frozenset[int]:
        return frozenset(self._load(xfer_id)[1])

    def pending(self, xfer_id: str) -> list[int]:
        manifest, acked = self._load(xfer_id)
        return [s for s in range(manifest.count) if s not in acked]

    def unfinished(self) -> list[Manifest]:
        """Manifests of journaled transfers; unreadable journal files are skipped with a warning."""
        out = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                out.append(self._load(path.stem)[0])
            except (SchemaError, KeyError) as exc:
                log.warning("ignoring unreadable upload journal %s: %s", path, exc)
        return out

    def find(self, sha256: bytes, total_size: int | None = None) -> Manifest | None:
        """An unfinished transfer of the payload with this digest, if any."""
        for m in self.unfinished():
            if m.sha256 == sha256 and (total_size is None or m.total_size == total_size):
                return m
        return None

    def finish(self, xfer_id: str) -> None:
        """Forget a completed (or abandoned) transfer."""
        self._cache.pop(xfer_id, None)
        self._path(xfer_id).unlink(missing_ok=True)


def plan_upload(
    payload: bytes, journal: UploadJournal, policy: ChunkPolicy = ChunkPolicy()
) -> tuple[Manifest, list[int]]:
    """Return the manifest and the seqs still to send for ``payload``: resumes an unfinished
    journaled transfer of the same bytes and chunking, else starts a new one."""
    digest = hashlib.sha256(payload).digest()
    existing = journal.find(digest, len(payload))
    if existing is not None and existing.chunk_size == policy.chunk_size:
        pending = journal.pending(existing.xfer_id)
        log.info("resuming upload %s: %d of %d chunks left", existing.xfer_id, len(pending), existing.count)
        return existing, pending
    manifest = split(payload, policy)
    journal.begin(manifest)
    return manifest, list(range(manifest.count))
