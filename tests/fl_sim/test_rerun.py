"""A second simulation into the same directory starts a new fleet (it used to run no rounds)."""

from __future__ import annotations

from pathlib import Path

from aggregator import checkpoint
from edge_client import state
from fl_sim.run import forget_old_fleet


def test_the_old_fleets_progress_is_forgotten(tmp_path: Path) -> None:
    checkpoint.mark_announced(tmp_path, 6)  # the previous run announced rounds 1..6
    (tmp_path / "state.json").write_text("{}")
    dev = tmp_path / "edge" / "device-0"
    dev.mkdir(parents=True)
    state.save(dev, state.DeviceState(seq=12, last_round=6))
    (tmp_path / "report.md").write_text("kept")  # results are only overwritten, never deleted up front
    assert checkpoint.next_round(0, checkpoint.last_announced(tmp_path)) == 7  # > rounds: nothing would run
    forget_old_fleet(tmp_path)
    assert checkpoint.next_round(0, checkpoint.last_announced(tmp_path)) == 1
    assert state.load(dev) == state.DeviceState() and not (tmp_path / "state.json").exists()
    assert (tmp_path / "report.md").read_text() == "kept"
