"""What a device must remember across a restart: its message sequence number and the last round seen.

The aggregator rejects an update whose sequence number is not above the device's last one (a
replay), and the device refuses an announcement for a round it has already seen (a replayed
RoundSpec). Both counters lived in memory, so a restarted device was locked out until its counter
passed the old value, and would accept an old signed announcement again. They are kept here,
written atomically (temp file, fsync, rename) *before* the number is used: a crash between the
write and the send wastes one number, never reuses one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.errors import ConfigError

log = logging.getLogger(__name__)

FILE = "device_state.json"


@dataclass(frozen=True)
class DeviceState:
    seq: int = 0  # the last sequence number used on the wire
    last_round: int = -1  # the last round whose announcement was accepted


def load(work: Path) -> DeviceState:
    p = work / FILE
    if not p.exists():
        return DeviceState()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        st = DeviceState(seq=int(data["seq"]), last_round=int(data["last_round"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        # Refuse rather than restart from zero: zero would be locked out (seq) or replayable (round).
        raise ConfigError(f"{p}: unreadable device state ({type(e).__name__}: {e}); "
                          "restore it from a backup, or delete it only if this device's keys are new") from None
    if st.seq < 0 or st.last_round < -1:
        raise ConfigError(f"{p}: invalid device state {asdict(st)}")
    return st


def save(work: Path, st: DeviceState) -> None:
    tmp = work / (FILE + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps(asdict(st)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, work / FILE)
