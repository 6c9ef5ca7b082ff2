"""Who is gone: an "offline" status drops a participant only when it is news (issue 11, broker outage).

Mosquitto sends every client's last will when it shuts down, even with a will delay, and after a
restart the retained statuses replay the wills of devices that are already back. Seen in
tests/test_faults.py: a 5 s broker outage dropped all three devices and voided the round.
"""

from __future__ import annotations

import time
from pathlib import Path

from aggregator.collect import Collector, RoundBook
from shared import messages as M


class Link:
    last_disconnect = 0.0
    last_reconnect = 0.0


def _col(tmp_path: Path) -> Collector:
    col = Collector(enrolled={"d0", "d1"}, keys=None, pubkeys={}, chunk_bytes=1 << 16, out_dir=tmp_path)
    col.link = Link()
    col.book = RoundBook(rnd=3, participants=["d0", "d1"], deadline=time.monotonic() + 60)
    return col


def _status(dev: str, state: str, detail: str = "") -> M.DeviceStatus:
    return M.DeviceStatus(device_id=dev, state=state, profile="cpu-dev", num_examples=0, detail=detail)  # type: ignore[arg-type]


def _age(col: Collector, seconds: float) -> None:
    col._suspects = {d: (t - seconds, det, r) for d, (t, det, r) in col._suspects.items()}


def test_a_live_will_drops_the_device_after_the_grace(tmp_path: Path) -> None:
    col = _col(tmp_path)
    col.on_status("d0", _status("d0", "offline", "connection lost"))
    col._settle_suspects()
    assert "d0" not in col.book.dropped  # type: ignore[union-attr]
    _age(col, col.OFFLINE_GRACE_S)
    col._settle_suspects()
    assert col.book.reasons["d0"] == "offline: connection lost"  # type: ignore[union-attr]


def test_a_will_sent_as_the_broker_went_down_is_not_a_dropout(tmp_path: Path) -> None:
    col = _col(tmp_path)
    col.on_status("d0", _status("d0", "offline", "connection lost"))
    col.link.last_disconnect = time.monotonic()  # our own link dropped right after it
    _age(col, col.OFFLINE_GRACE_S)
    col._settle_suspects()
    assert not col.book.dropped  # type: ignore[union-attr]


def test_a_retained_will_replayed_on_reconnect_is_not_a_dropout(tmp_path: Path) -> None:
    col = _col(tmp_path)
    col.on_status("d1", _status("d1", "offline", "connection lost"), retained=True)
    _age(col, 60)
    col._settle_suspects()
    assert not col.book.dropped and "d1" not in col.online  # type: ignore[union-attr]


def test_a_will_queued_during_the_outage_after_the_device_is_back_is_ignored(tmp_path: Path) -> None:
    """Seen on one core: after a broker restart the wills it sent as it shut down come out of our
    session's queue as live messages, after d0's "online" (its birth) and before d1's. d0 stays
    online and in the round; d1 is not a dropout yet and is online again when its birth comes."""
    col = _col(tmp_path)
    col.link.last_disconnect = time.monotonic() - 8
    col.link.last_reconnect = time.monotonic()
    col.on_status("d0", _status("d0", "online", "reconnected"))
    col.on_status("d0", _status("d0", "offline", "connection lost"))
    col.on_status("d1", _status("d1", "offline", "connection lost"))
    _age(col, 60)
    col._settle_suspects()
    assert not col.book.dropped and sorted(col.online) == ["d0"]  # type: ignore[union-attr]
    col.on_status("d1", _status("d1", "online", "reconnected"))
    assert sorted(col.online) == ["d0", "d1"]


def test_a_will_long_after_our_reconnect_is_news(tmp_path: Path) -> None:
    col = _col(tmp_path)
    col.link.last_reconnect = time.monotonic() - col.RECONNECT_SETTLE_S - 1
    col.on_status("d0", _status("d0", "online", "reconnected"))
    col.on_status("d0", _status("d0", "offline", "connection lost"))
    _age(col, col.OFFLINE_GRACE_S)
    col._settle_suspects()
    assert col.book.reasons == {"d0": "offline: connection lost"} and "d0" not in col.online  # type: ignore[union-attr]


def test_back_online_before_the_grace_cancels_the_drop_but_a_restart_does_not(tmp_path: Path) -> None:
    col = _col(tmp_path)
    for d in ("d0", "d1"):
        col.on_status(d, _status(d, "offline", "connection lost"))
    col.on_status("d0", _status("d0", "online", "reconnected"))  # the same process, after an outage
    col.on_status("d1", _status("d1", "online", "started"))  # a new process: its round secrets are gone
    _age(col, 60)
    col._settle_suspects()
    assert col.book.reasons == {"d1": "restarted during the round"}  # type: ignore[union-attr]
    assert sorted(col.online) == ["d0", "d1"]  # both take part in the next round


def test_a_restart_that_resumes_the_current_plain_round_stays_in_it(tmp_path: Path) -> None:
    """Issue 13: a device restarted with a training checkpoint of this round says so, and the round
    waits for its update; a restart without one, or resuming another round, is still a dropout."""
    from tests.specs import dense_spec

    col = Collector(enrolled={"d0", "d1", "d2", "d3"}, keys=None, pubkeys={}, chunk_bytes=1 << 16, out_dir=tmp_path)
    col.link = Link()
    col.book = b = RoundBook(rnd=3, participants=["d0", "d1", "d2", "d3"], deadline=time.monotonic() + 60)
    b.spec = dense_spec(3, b.participants, 4)
    for d in b.participants:
        col.on_status(d, _status(d, "offline", "connection lost"))  # each old process's will
    col.on_status("d0", _status("d0", "online", M.resuming(3, 7)))
    col.on_status("d1", _status("d1", "online", M.STARTED))
    col.on_status("d2", _status("d2", "online", M.resuming(2, 7)))  # a round that is over
    col.on_status("d3", _status("d3", "online", "resuming round 3 at step 7, or so"))  # not the form: an ordinary online
    _age(col, 60)
    col._settle_suspects()
    assert b.reasons == {"d1": "restarted during the round", "d2": "restarted during the round"}
    assert b.waiting_for() == {"d0", "d3"}


def test_a_secure_round_drops_a_device_that_claims_to_resume_it(tmp_path: Path) -> None:
    """Its mask secrets died with the old process: no checkpoint can bring them back."""
    import dataclasses

    from tests.specs import dense_spec

    col = _col(tmp_path)
    sa = M.SecAggSpec(node_ids=(1, 2), threshold=2, graph_seed=bytes(32), clip=0.05, ring_bits=32, value_bits=16,
                      weight_norm=20, sketch_block=0)
    col.book.spec = dataclasses.replace(dense_spec(3, ["d0", "d1"], 4), secagg=sa)  # type: ignore[union-attr]
    col.on_status("d0", _status("d0", "online", M.resuming(3, 7)))
    assert col.book.reasons == {"d0": "restarted during the round"}  # type: ignore[union-attr]
