"""Collection one device cannot exhaust: per-device transfers, caps from the round, stage checks.

The attack of issue 9: four 74-byte manifests from one enrolled device declared 4 GiB between
them, blocked the aggregator while it reserved the memory, and made an honest device's upload
fail. Here each is tried again against the aggregator's collector.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator import plan, registry
from aggregator.config import AggregatorConfig
from aggregator.server import Aggregator, RoundBook
from shared import messages as M
from shared import secure, tensors, topics
from shared.chunking import ChunkPolicy, Manifest, iter_chunks, split
from shared.crypto import DeviceKeys, generate_keys, save_private_keys, save_public_keys
from shared.datasets import Example, write_jsonl
from tests.specs import dense_spec

DIM = 50_000  # a 200 kB dense update: several chunks of 16 KiB
SMALL = ChunkPolicy(max_message_bytes=16 * 1024)


@pytest.fixture
def agg(tmp_path: Path) -> tuple[Aggregator, DeviceKeys, dict[str, DeviceKeys]]:
    agg_keys = generate_keys()
    devs = {d: generate_keys() for d in ("dev-a", "dev-b", "dev-c")}
    save_private_keys(agg_keys, tmp_path / "agg.key")
    save_public_keys(generate_keys().public, tmp_path / "authority.pub.json")
    for d, k in devs.items():
        registry.enroll(tmp_path / "reg.json", d, k.public)
    write_jsonl(tmp_path / "eval.jsonl", [Example("Add.", "1 2", "3", "arith")])
    a = Aggregator(AggregatorConfig(broker="mqtt://127.0.0.1:1", student="unused", eval_data=str(tmp_path / "eval.jsonl"),
                                    out_dir=str(tmp_path / "out"), keys=str(tmp_path / "agg.key"),
                                    registry=str(tmp_path / "reg.json"), authority=str(tmp_path / "authority.pub.json"), mode="fedit"))
    a.digest = "ab" * 32
    a.global_state = {"w": np.zeros(DIM, np.float32)}
    spec = dense_spec(2, ["dev-a", "dev-b"], DIM)
    a.book = RoundBook(rnd=2, participants=["dev-a", "dev-b"], deadline=1e18, spec=spec,
                       max_upload=plan.upload_cap(spec, a.global_state))
    return a, agg_keys, devs


def _sealed_update(dev: DeviceKeys, agg_keys: DeviceKeys, device: str) -> bytes:
    up = M.Update(round=2, device_id=device, seq=1, num_examples=3, steps=1, train_loss=0.5, payload="delta",
                  base_digest="ab" * 32, tensors=tensors.pack({"w": np.ones(DIM, np.float32)}))
    return secure.seal_message(up, round=2, device_id=device, sender=dev, recipient=agg_keys.public)


def _upload(a: Aggregator, device: str, payload: bytes) -> None:
    m = split(payload, SMALL)
    a.dispatch(topics.up(device, "chunk"), m.encode(), 100)
    for c in iter_chunks(payload, m):
        a.dispatch(topics.up(device, "chunk"), c.encode(), 100)


def _manifest(total: int) -> bytes:
    return Manifest(xfer_id=os.urandom(8).hex(), total_size=total, chunk_size=SMALL.chunk_size,
                    count=-(-total // SMALL.chunk_size), sha256=bytes(32)).encode()


def test_huge_manifests_cost_nothing_and_an_honest_upload_completes(agg, caplog) -> None:
    a, agg_keys, devs = agg
    t0 = time.monotonic()
    for _ in range(4):  # the 4 GiB attack, and more of it
        a.dispatch(topics.up("dev-a", "chunk"), _manifest(1 << 30), 74)
    assert time.monotonic() - t0 < 1.0
    assert a.col.uploads.active_transfers == 0 and a.col.uploads.reserved_bytes == 0
    assert a.book.rejected == 4 and "are at most" in caplog.text
    _upload(a, "dev-b", _sealed_update(devs["dev-b"], agg_keys, "dev-b"))
    assert list(a.book.replies) == ["dev-b"]


def test_many_manifests_from_one_device_hold_one_transfer(agg) -> None:
    a, agg_keys, devs = agg
    cap = a.book.max_upload
    for _ in range(200):  # each within the cap: still one transfer slot, the device's own
        a.dispatch(topics.up("dev-a", "chunk"), _manifest(cap), 74)
    senders = [s for s, _ in a.col.uploads._transfers]  # noqa: SLF001
    assert senders == ["dev-a"]
    assert a.col.uploads.reserved_bytes <= cap  # the stated bound: participants x cap at most
    # Meanwhile the honest device's upload goes through, and so does the attacker's real one.
    _upload(a, "dev-b", _sealed_update(devs["dev-b"], agg_keys, "dev-b"))
    _upload(a, "dev-a", _sealed_update(devs["dev-a"], agg_keys, "dev-a"))
    assert sorted(a.book.replies) == ["dev-a", "dev-b"]
    assert a.col.uploads.reserved_bytes == 0


def test_manifests_only_from_participants_in_the_update_stage(agg, caplog) -> None:
    a, agg_keys, devs = agg
    a.dispatch(topics.up("dev-c", "chunk"), _manifest(1000), 74)  # enrolled, but not in this round
    assert "not a participant" in caplog.text
    a.book.stage = "share"
    a.dispatch(topics.up("dev-a", "chunk"), _manifest(1000), 74)
    assert "outside its update stage" in caplog.text
    a.book.stage = "update"
    _upload(a, "dev-b", _sealed_update(devs["dev-b"], agg_keys, "dev-b"))
    a.dispatch(topics.up("dev-b", "chunk"), _manifest(1000), 74)  # it already answered
    assert a.col.uploads.active_transfers == 0 and a.book.rejected == 3


class _Recorder:
    """The part of the link a clear uses: what was published, and how."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, bool]] = []

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 60.0) -> int:
        self.published.append((topic, payload, retain))
        return len(payload)


# (topic, cleared?): anything retained under up/ except the device's own presence topic is cleared
# with an empty retained message, enrolled or not, well-formed or not; nothing outside up/ is touched.
RETAINED = [
    (topics.up("dev-a", "update"), True),
    (topics.up("dev-a", "chunk"), True),
    (topics.up("dev-a", "secagg"), True),
    (topics.up("dev-x", "update"), True),  # an unenrolled device's
    ("flm/v1/up/dev-a/junk/0", True),
    ("flm/v1/up/dev-a/JUNK", True),
    ("flm/v1/up/dev\nfake log line/x", True),  # the device id is named only when it is one
    ("flm/v1/up/", True),
    (topics.up("dev-a", "status"), False),  # its presence: kept
    (topics.up("dev-x", "status"), False),
    (topics.bcast("announce"), False),  # not an upload: never ours to clear
    (topics.down("dev-a", "round"), False),
]


@pytest.mark.parametrize("topic,cleared", RETAINED)
def test_retained_junk_is_cleared_and_never_parsed(agg, caplog, topic: str, cleared: bool) -> None:
    a, agg_keys, devs = agg
    a.link = link = _Recorder()
    data = _sealed_update(devs["dev-a"], agg_keys, "dev-a") if "update" in topic else os.urandom(300)
    a.dispatch(topic, data, len(data), retain=True)
    assert not a.book.replies
    assert link.published == ([(topic, b"", True)] if cleared else [])
    assert a.col.cleared_retained == int(cleared)
    if cleared:
        assert a.book.rejected == 0  # not parsed, so not a rejection either
        line = next(r.getMessage() for r in caplog.records if "only a device's status may be retained" in r.getMessage())
        assert "\n" not in line and ("(device dev-a)" in line or "dev-a" not in topic)


def test_a_clear_is_logged_once_per_topic_and_its_echo_ignored(agg, caplog) -> None:
    a, agg_keys, devs = agg
    a.link = link = _Recorder()
    junk = [topics.up("dev-a", "chunk"), "flm/v1/up/dev-a/junk/1"]
    for _ in range(3):  # replayed to each new subscription of ours, until the broker drops it
        for topic in junk:
            a.dispatch(topic, b"x" * 1000, 1000, retain=True)
    assert a.col.cleared_retained == 6 and len(link.published) == 6
    assert sum("only a device's status may be retained" in r.getMessage() for r in caplog.records) == 2
    for topic in junk:  # the broker forwards our empty clears to our own subscription, live
        a.dispatch(topic, b"", 30)
    assert a.book.rejected == 0
    # A retained status stays and is handled as presence; a live update still goes through.
    a.dispatch(topics.up("dev-b", "update"), _sealed_update(devs["dev-b"], agg_keys, "dev-b"), 100)
    assert list(a.book.replies) == ["dev-b"] and len(link.published) == 6


def test_a_clear_without_a_link_is_counted_and_the_message_still_ignored(agg, caplog) -> None:
    a, agg_keys, devs = agg
    data = _sealed_update(devs["dev-a"], agg_keys, "dev-a")
    a.dispatch(topics.up("dev-a", "update"), data, len(data), retain=True)
    assert not a.book.replies and a.col.cleared_retained == 1 and "could not clear" in caplog.text


def test_repeated_manifests_do_not_keep_a_transfer_alive() -> None:
    from shared.chunking import Reassembler

    clock = [0.0]
    r = Reassembler(idle_timeout_s=10, clock=lambda: clock[0], max_per_sender=1)
    payload = os.urandom(40_000)
    m = split(payload, SMALL)
    r.start(m, sender="d")
    for _ in range(5):
        clock[0] += 3
        assert r.start(m, sender="d") is False  # a repeat: accepted, but not activity
    assert r.expire() == [("d", m.xfer_id)]


# -- issue 11: nobody waits for a device that cannot contribute ------------------------------------


def _sealed(dev: DeviceKeys, agg_keys: DeviceKeys, device: str, **over: object) -> bytes:
    fields = dict(round=2, device_id=device, seq=1, num_examples=3, steps=1, train_loss=0.5, payload="delta",
                  base_digest="ab" * 32, tensors=tensors.pack({"w": np.ones(DIM, np.float32)}))
    fields.update(over)
    return secure.seal_message(M.Update(**fields), round=2, device_id=device, sender=dev, recipient=agg_keys.public)  # type: ignore[arg-type]


def test_a_rejected_update_drops_its_sender_at_once(agg) -> None:
    """A device on a stale base (or with its counter behind after a restart) is a dropout now,
    with the reason recorded, instead of being awaited until the deadline."""
    a, agg_keys, devs = agg
    _upload(a, "dev-a", _sealed(devs["dev-a"], agg_keys, "dev-a", base_digest="cd" * 32))
    assert "dev-a" in a.book.dropped and a.book.reasons["dev-a"].startswith("rejected: SchemaError")
    assert a.book.waiting_for() == {"dev-b"}
    a.col.last_seq["dev-b"] = 7  # dev-b restarted and its counter is behind
    _upload(a, "dev-b", _sealed(devs["dev-b"], agg_keys, "dev-b", seq=3))
    assert a.book.waiting_for() == set() and "ReplayError" in a.book.reasons["dev-b"]


def test_a_replayed_update_does_not_drop_the_device_that_sent_it(agg) -> None:
    a, agg_keys, devs = agg
    data = _sealed(devs["dev-b"], agg_keys, "dev-b")
    _upload(a, "dev-b", data)
    _upload(a, "dev-b", data)  # the broker replays it
    assert list(a.book.replies) == ["dev-b"] and "dev-b" not in a.book.dropped and a.book.rejected >= 1


def test_a_declined_device_leaves_with_its_reason(agg) -> None:
    a, agg_keys, devs = agg
    st = M.DeviceStatus(device_id="dev-a", state="declined", detail="non-finite update: 3 of 9 values are NaN or Inf",
                        num_examples=0, profile="x")
    data = secure.sign_message(st, round=0, device_id="dev-a", key=devs["dev-a"])
    a.dispatch(topics.up("dev-a", "status"), data, len(data))
    assert a.book.waiting_for() == {"dev-b"} and a.book.reasons["dev-a"].startswith("declined: non-finite")


def test_a_later_stage_gets_its_own_budget_after_a_spent_deadline(agg) -> None:
    """The unmask stage once inherited min(now + key_timeout, deadline) = no time at all."""

    class Quiet:
        def get(self, timeout: float | None = None) -> None:
            time.sleep(min(timeout or 0.0, 0.01))
            return None

    a, _, _ = agg
    a.book.deadline = time.monotonic() - 1.0  # the update stage used the whole round budget
    a.col.link = Quiet()
    t0 = time.monotonic()
    a.col.collect("unmask", {"dev-a"}, 0.4)
    assert 0.35 <= time.monotonic() - t0 < 2.0
    assert a.book.reasons["dev-a"] == "no unmask message within 0.4 s"
