"""A second simulation into the same directory starts a new fleet (it used to run no rounds)."""

from __future__ import annotations

from pathlib import Path

from aggregator import checkpoint
from edge_client import state
from fl_sim.run import forget_old_fleet


def test_the_old_fleets_progress_is_forgotten(tmp_path: Path) -> None:
    st = checkpoint.open_store(tmp_path)
    st.mark_announced(6, {"device-0": 12})  # the previous run announced rounds 1..6
    st.close()
    (tmp_path / "state.json").write_text("{}")
    dev = tmp_path / "edge" / "device-0"
    dev.mkdir(parents=True)
    state.save(dev, state.DeviceState(seq=12, last_round=6))
    (tmp_path / "report.md").write_text("kept")  # results are only overwritten, never deleted up front
    assert checkpoint.next_round(0, checkpoint.open_store(tmp_path).announced()) == 7  # > rounds: nothing would run
    forget_old_fleet(tmp_path)
    assert checkpoint.next_round(0, checkpoint.open_store(tmp_path).announced()) == 1
    assert state.load(dev) == state.DeviceState() and not (tmp_path / "state.json").exists()
    assert (tmp_path / "report.md").read_text() == "kept"
