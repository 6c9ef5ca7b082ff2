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
