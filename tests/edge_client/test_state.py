"""The device's durable counters (edge_client/state.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_client import state
from shared.errors import ConfigError


def test_round_trip_and_default(tmp_path: Path) -> None:
    assert state.load(tmp_path) == state.DeviceState(seq=0, last_round=-1)
    state.save(tmp_path, state.DeviceState(seq=7, last_round=3))
    assert state.load(tmp_path) == state.DeviceState(seq=7, last_round=3)
    assert not (tmp_path / (state.FILE + ".tmp")).exists()


@pytest.mark.parametrize("text", ["", "{", '{"seq": 3}', '{"seq": "x", "last_round": 1}', '{"seq": -1, "last_round": 1}', "[]"])
def test_a_damaged_state_is_refused_not_reset(tmp_path: Path, text: str) -> None:
    # Starting again from 0 would lock the device out (seq) or make old announcements acceptable.
    (tmp_path / state.FILE).write_text(text)
    with pytest.raises(ConfigError, match=state.FILE):
        state.load(tmp_path)
