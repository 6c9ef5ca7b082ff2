"""The aggregator's store: one transaction per round boundary, counters that only go up, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aggregator import checkpoint
from aggregator.store import RoundState, Store, StoreError


def _st(rnd: int, version: int) -> RoundState:
    return RoundState(round=rnd, version=version, checkpoint=f"/ck/round_{rnd:04d}")


def test_a_round_commits_whole_and_survives_reopening(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.db")
    assert s.state() is None and s.announced() == 0
    s.mark_announced(1, {"d0": 3})
    s.commit_round(_st(1, 1), {"optimizer": {"m": np.arange(4.0)}, "sparse": {"scores": np.ones(3, np.float32)}}, {"d0": 5, "d1": 2})
    s.close()
    s = Store(tmp_path / "a.db")
    assert s.state() == _st(1, 1) and s.announced() == 1
    np.testing.assert_array_equal(s.arrays("optimizer")["m"], np.arange(4.0))
    assert s.arrays("sparse")["scores"].dtype == np.float32 and s.arrays("missing") == {}
    assert s.replay_counters() == {"d0": 5, "d1": 2}
    assert [p for _, p, _ in s.phases()] == ["announced", "applied"]


def test_a_crash_inside_a_commit_leaves_the_previous_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Store(tmp_path / "a.db")
    s.commit_round(_st(1, 1), {"optimizer": {"m": np.zeros(2)}}, {"d0": 1})

    def boom(*a: object, **k: object) -> None:
        raise KeyboardInterrupt  # the process dies between the pointer and the arrays

    monkeypatch.setattr(s, "_put_replay", boom)
    with pytest.raises(KeyboardInterrupt):
        s.commit_round(_st(2, 2), {"optimizer": {"m": np.ones(2)}}, {"d0": 9})
    monkeypatch.undo()
    s.close()
    s = Store(tmp_path / "a.db")
    assert s.state() == _st(1, 1)
    np.testing.assert_array_equal(s.arrays("optimizer")["m"], np.zeros(2))  # not round 2's moments
    assert s.replay_counters() == {"d0": 1}


def test_replay_counters_never_go_down(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.db")
    s.mark_announced(1, {"d0": 7})
    s.abandon(1, "quorum", {"d0": 4, "d1": 1})  # an older view of the counters must not win
    assert s.replay_counters() == {"d0": 7, "d1": 1}
    assert s.phases(1)[-1] == (1, "abandoned", "quorum")


def test_a_damaged_or_foreign_file_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database at all, just bytes" * 100)
    with pytest.raises(StoreError, match="bad.db: not a readable aggregator state file"):
        Store(bad)
    s = Store(tmp_path / "new.db")
    s.db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    s.close()
    with pytest.raises(StoreError, match="schema 99"):
        Store(tmp_path / "new.db")


def test_a_directory_from_before_the_store_is_imported(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"round": 4, "checkpoint": "/ck/round_0004", "teacher_checkpoint": None}))
    (tmp_path / "announced.json").write_text(json.dumps({"round": 5}))
    with (tmp_path / "server_optimizer.npz").open("wb") as f:
        np.savez(f, m=np.full(3, 2.0))
    np.save(tmp_path / "sparse_scores.npy", np.arange(5.0))
    s = checkpoint.open_store(tmp_path)
    assert s.state() == RoundState(round=4, version=4, checkpoint="/ck/round_0004") and s.announced() == 5
    np.testing.assert_array_equal(s.arrays("optimizer")["m"], np.full(3, 2.0))
    np.testing.assert_array_equal(s.arrays("sparse")["scores"], np.arange(5.0))
    assert checkpoint.next_round(s.state().round, s.announced()) == 6  # type: ignore[union-attr]
