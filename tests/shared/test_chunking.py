"""shared.chunking: frames, reassembly bounds, integrity, and resume via the upload journal."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.chunking import (
    AWS_IOT_MAX_MESSAGE_BYTES,
    Chunk,
    ChunkPolicy,
    IntegrityError,
    Manifest,
    Reassembler,
    TransferRejected,
    UploadJournal,
    decode_frame,
    iter_chunks,
    needs_chunking,
    plan_upload,
    split,
)
from shared.errors import ProtocolError, SchemaError, TruncatedError

SMALL = ChunkPolicy(max_message_bytes=1024 + 128 + 100, reserve=100)  # 1024-byte chunks


def _send_all(payload: bytes, manifest: Manifest, r: Reassembler, seqs: list[int] | None = None, **kw) -> bytes | None:
    out = None
    for ch in iter_chunks(payload, manifest, seqs):
        res = r.add(Chunk.decode(ch.encode()), **kw)
        if res is not None:
            out = res
    return out


# --- frames ----------------------------------------------------------------------------------------


def test_chunk_frame_round_trip_and_size_bound() -> None:
    for policy in (ChunkPolicy(), ChunkPolicy.aws_iot()):
        payload = os.urandom(policy.chunk_size * 2 + 17)
        m = split(payload, policy, xfer_id="x" * 64)
        assert Manifest.decode(m.encode()) == m
        chunks = list(iter_chunks(payload, m))
        assert len(chunks) == m.count == 3
        for ch in chunks:
            enc = ch.encode()
            assert Chunk.decode(enc) == ch
            assert len(enc) <= policy.max_message_bytes - policy.reserve
        worst = Chunk("x" * 64, 2**32 - 1, bytes(policy.chunk_size)).encode()
        assert len(worst) <= policy.max_message_bytes - policy.reserve
    assert ChunkPolicy.aws_iot().max_message_bytes == AWS_IOT_MAX_MESSAGE_BYTES < 128 * 1000
    assert needs_chunking(300 * 1024) and not needs_chunking(1000)


def test_chunk_frame_malformed_inputs_raise_typed_errors() -> None:
    m = split(b"a" * 3000, SMALL, xfer_id="abc")
    good_m, good_c = m.encode(), next(iter_chunks(b"a" * 3000, m)).encode()
    for good in (good_m, good_c):
        for cut in range(len(good)):
            with pytest.raises(TruncatedError):
                decode_frame(good[:cut])
        with pytest.raises(SchemaError):
            decode_frame(good + b"\x00")
    bad_objects = [
        {"tag": "flm.xfer.chunk"},
        ["flm.xfer.chunk", 1, "abc", 0],
        ["flm.xfer.chunk", 2, "abc", 0, b"x"],
        ["flm.xfer.chunk", True, "abc", 0, b"x"],
        ["flm.xfer.chunk", 1, "a/b", 0, b"x"],
        ["flm.xfer.chunk", 1, "abc", -1, b"x"],
        ["flm.xfer.chunk", 1, "abc", 0, b""],
        ["flm.xfer.chunk", 1, "abc", 0, "text not bin"],
        ["flm.xfer.chunk", 1, "abc", 1.5, b"x"],
        ["flm.xfer.other", 1, "abc", 0, b"x"],
        ["flm.xfer.manifest", 1, "abc", 3000, 1024, 2, b"\x00" * 32, None],  # count wrong
        ["flm.xfer.manifest", 1, "abc", 3000, 1024, 3, b"\x00" * 31, None],
        ["flm.xfer.manifest", 1, "abc", 3000, 1024, 3, b"\x00" * 32, [b"\x00" * 32]],
        ["flm.xfer.manifest", 1, "abc", 0, 1024, 0, b"\x00" * 32, None],
        "just a string",
        42,
    ]
    for obj in bad_objects:
        with pytest.raises(SchemaError):
            decode_frame(msgpack.packb(obj, use_bin_type=True))
    for raw in (b"\xc1", b"\x95\xa2\xff\xfe", msgpack.ExtType(1, b"x") and msgpack.packb(msgpack.ExtType(1, b"x"))):
        with pytest.raises(SchemaError):
            decode_frame(raw)
    with pytest.raises(SchemaError):
        Chunk.decode(good_m)
    with pytest.raises(SchemaError):
        Manifest.decode(good_c)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_chunk_decode_fuzz_only_typed_errors(data: bytes) -> None:
    try:
        decode_frame(data)
    except ProtocolError:
        pass


# --- reassembly ------------------------------------------------------------------------------------


def test_chunk_50mb_split_reassemble_at_256k() -> None:
    payload = random.Random(0).randbytes(50 * 1000 * 1000)
    policy = ChunkPolicy()
    m = split(payload, policy)
    assert m.count == -(-len(payload) // policy.chunk_size) and policy.chunk_size > 250 * 1024
    r = Reassembler(max_transfer_bytes=64 * 2**20, max_total_bytes=64 * 2**20)
    assert r.start(Manifest.decode(m.encode()), sender="dev-a")
    order = list(range(m.count))
    random.Random(1).shuffle(order)  # arrival order does not matter
    out = _send_all(payload, m, r, order, sender="dev-a")
    assert out == payload
    assert r.active_transfers == 0 and r.reserved_bytes == 0


def test_chunk_idempotent_on_repeats_and_reports_missing() -> None:
    payload = os.urandom(5000)
    m = split(payload, SMALL)
    r = Reassembler()
    assert r.start(m) is True
    assert r.start(m) is False  # repeated manifest
    chunks = list(iter_chunks(payload, m))
    assert r.missing(m.xfer_id) == [0, 1, 2, 3, 4]
    for seq in (3, 0, 3, 0):
        assert r.add(chunks[seq]) is None
    assert r.missing(m.xfer_id) == [1, 2, 4]
    assert r.add(chunks[1]) is None and r.add(chunks[4]) is None
    assert r.add(chunks[2]) == payload
    assert r.missing(m.xfer_id) == [] and r.is_complete(m.xfer_id)
    assert r.add(chunks[2]) is None  # late duplicate after completion is ignored
    assert r.start(m) is False


def test_chunk_tampered_chunk_rejected_then_good_retransmission_completes() -> None:
    payload = os.urandom(3000)
    m = split(payload, SMALL)
    r = Reassembler()
    r.start(m)
    chunks = list(iter_chunks(payload, m))
    evil = bytearray(chunks[1].data)
    evil[10] ^= 1
    with pytest.raises(IntegrityError):
        r.add(Chunk(m.xfer_id, 1, bytes(evil)))
    assert r.missing(m.xfer_id) == [0, 1, 2]  # the bad chunk was not stored
    r.add(chunks[0])
    r.add(chunks[1])
    with pytest.raises(IntegrityError):  # a stored chunk repeated with other bytes
        r.add(Chunk(m.xfer_id, 0, bytes(evil)))
    assert r.add(chunks[2]) == payload


def test_chunk_tampered_without_per_chunk_digests_fails_whole_digest() -> None:
    payload = os.urandom(3000)
    policy = ChunkPolicy(max_message_bytes=SMALL.max_message_bytes, reserve=SMALL.reserve, per_chunk_digests=False)
    m = split(payload, policy)
    assert m.chunk_sha256 is None
    r = Reassembler()
    r.start(m)
    chunks = list(iter_chunks(payload, m))
    r.add(chunks[0])
    r.add(Chunk(m.xfer_id, 1, bytes(b ^ 0xFF for b in chunks[1].data)))
    with pytest.raises(IntegrityError):
        r.add(chunks[2])
    assert r.active_transfers == 0 and r.reserved_bytes == 0  # dropped cleanly
    with pytest.raises(TransferRejected):
        r.missing(m.xfer_id)


def test_chunk_wrong_length_or_seq_is_schema_error() -> None:
    payload = os.urandom(3000)
    m = split(payload, SMALL)
    r = Reassembler()
    r.start(m)
    with pytest.raises(SchemaError):
        r.add(Chunk(m.xfer_id, 0, b"short"))
    with pytest.raises(SchemaError):
        r.add(Chunk(m.xfer_id, 3, b"x"))
    with pytest.raises(SchemaError):
        r.add(Chunk(m.xfer_id, 2, os.urandom(1024)))  # last chunk must be 3000 - 2048 bytes


def test_chunk_senders_are_isolated() -> None:
    payload = os.urandom(3000)
    m = split(payload, SMALL)
    r = Reassembler()
    r.start(m, sender="dev-a")
    with pytest.raises(TransferRejected):  # dev-b cannot add to dev-a's transfer
        r.add(next(iter_chunks(payload, m)), sender="dev-b")
    assert _send_all(payload, m, r, sender="dev-a") == payload


def test_chunk_bounds_too_big_too_many_and_budget() -> None:
    r = Reassembler(max_transfers=2, max_transfer_bytes=10_000, max_total_bytes=15_000, max_chunks=8)
    with pytest.raises(TransferRejected, match="per transfer"):
        r.start(split(os.urandom(10_001), ChunkPolicy(max_message_bytes=20_000, reserve=100)))
    with pytest.raises(TransferRejected, match="chunks"):
        r.start(split(os.urandom(9 * 1024), SMALL))
    assert r.start(split(os.urandom(8000), SMALL))
    with pytest.raises(TransferRejected, match="budget"):
        r.start(split(os.urandom(8000), SMALL))
    assert r.start(split(os.urandom(5000), SMALL))
    with pytest.raises(TransferRejected, match="in progress"):
        r.start(split(os.urandom(100), SMALL))
    assert r.reserved_bytes == 13_000 and r.active_transfers == 2
    with pytest.raises(TransferRejected):  # conflicting manifest for a known id
        first = next(iter(r._transfers.values())).manifest
        r.start(split(os.urandom(100), SMALL, xfer_id=first.xfer_id))


def test_chunk_expiry_drops_idle_transfers() -> None:
    clock = [1000.0]
    r = Reassembler(idle_timeout_s=30, max_transfers=1, clock=lambda: clock[0])
    payload = os.urandom(3000)
    m = split(payload, SMALL)
    r.start(m)
    chunks = list(iter_chunks(payload, m))
    clock[0] += 20
    r.add(chunks[0])  # activity resets the idle timer
    clock[0] += 20
    assert r.expire() == []
    clock[0] += 11
    assert r.expire() == [("", m.xfer_id)]
    assert r.active_transfers == 0 and r.reserved_bytes == 0
    with pytest.raises(TransferRejected):
        r.add(chunks[1])
    with pytest.raises(TransferRejected):
        r.missing(m.xfer_id)
    # A full slot frees itself when the occupant has gone idle.
    m2 = split(os.urandom(100), SMALL)
    r.start(m2)
    clock[0] += 31
    assert r.start(split(os.urandom(100), SMALL))
    assert r.active_transfers == 1
    # The sender re-sends the manifest and everything: it completes (the idle occupant expires).
    clock[0] += 31
    assert r.start(m)
    assert _send_all(payload, m, r) == payload


# --- journal / resume ------------------------------------------------------------------------------


def test_chunk_resume_after_restart_sends_only_the_rest(tmp_path: Path) -> None:
    payload = os.urandom(20_000)
    receiver = Reassembler()
    sent: list[int] = []

    # First "process": plans the upload, sends 8 chunks, of which 7 were acknowledged, dies.
    journal = UploadJournal(tmp_path / "journal")
    manifest, todo = plan_upload(payload, journal, SMALL)
    assert todo == list(range(manifest.count)) and manifest.count == 20
    receiver.start(Manifest.decode(manifest.encode()), sender="dev-a")
    for ch in iter_chunks(payload, manifest, todo[:8]):
        receiver.add(Chunk.decode(ch.encode()), sender="dev-a")
        sent.append(ch.seq)
        if ch.seq < 7:  # the 8th ack never came back before the crash
            journal.mark_acked(manifest.xfer_id, ch.seq)
    del journal

    # Second "process": a fresh journal object on the same directory.
    journal2 = UploadJournal(tmp_path / "journal")
    manifest2, todo2 = plan_upload(payload, journal2, SMALL)
    assert manifest2 == manifest
    assert todo2 == list(range(7, 20))
    assert receiver.start(manifest2, sender="dev-a") is False  # idempotent re-announce
    out = None
    for ch in iter_chunks(payload, manifest2, todo2):
        sent.append(ch.seq)
        res = receiver.add(Chunk.decode(ch.encode()), sender="dev-a")
        journal2.mark_acked(manifest2.xfer_id, ch.seq)
        out = res if res is not None else out
    assert out == payload
    assert sorted(sent) == sorted(list(range(20)) + [7])  # only the unacknowledged one twice
    assert journal2.pending(manifest2.xfer_id) == []
    journal2.finish(manifest2.xfer_id)
    assert journal2.unfinished() == []
    # A different payload starts a new transfer.
    m3, todo3 = plan_upload(os.urandom(2000), journal2, SMALL)
    assert m3.xfer_id != manifest.xfer_id and todo3 == [0, 1]


def test_chunk_journal_rejects_corrupt_files(tmp_path: Path) -> None:
    j = UploadJournal(tmp_path)
    m = split(os.urandom(3000), SMALL)
    assert j.begin(m) == frozenset()
    j.mark_acked(m.xfer_id, [0, 2])
    assert UploadJournal(tmp_path).acked(m.xfer_id) == {0, 2}
    assert j.begin(m) == {0, 2}
    with pytest.raises(ValueError):
        j.mark_acked(m.xfer_id, 3)
    path = tmp_path / f"{m.xfer_id}.json"
    obj = json.loads(path.read_text())
    obj["acked"] = [0, 99]
    path.write_text(json.dumps(obj))
    with pytest.raises(SchemaError):
        UploadJournal(tmp_path).acked(m.xfer_id)
    path.write_text("{not json")
    with pytest.raises(SchemaError):
        UploadJournal(tmp_path).acked(m.xfer_id)
    assert UploadJournal(tmp_path).unfinished() == []  # skipped with a warning
    with pytest.raises(SchemaError):
        j.acked("../escape")


def test_chunk_manifest_digest_matches_payload() -> None:
    payload = os.urandom(4096)
    m = split(payload, SMALL)
    assert m.sha256 == hashlib.sha256(payload).digest()
    assert m.chunk_sha256 is not None and m.chunk_sha256[0] == hashlib.sha256(payload[:1024]).digest()
    with pytest.raises(ValueError):
        split(b"", SMALL)
