"""Issue 23: a damaged store never resets the fleet; a backup restores the same state; a full or
read-only disk ends in one line with the store intact.

Each damage is done to a real store left by real commits, beside the files a run leaves
(checkpoint directories, ``state.json``, ``metrics.jsonl``), and opened the way the aggregator
opens it at start (``checkpoint.open_store``).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from aggregator import backup, checkpoint, store_check
from aggregator.store import FILE, RoundState, Store, StoreError


def _run_dir(tmp_path: Path, rounds: int = 3) -> Path:
    """What an aggregator leaves after ``rounds`` committed rounds, its store still open (as after a kill -9)."""
    out = tmp_path / "out"
    out.mkdir()
    s = Store(out / FILE)
    for r in range(rounds + 1):
        d = checkpoint.checkpoint_dir(out, r)
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"w" * 64)
        if r:
            s.mark_announced(r, {"d0": r})
        st = RoundState(r, r, str(d))
        s.commit_round(st, {"optimizer": {"m": np.full(4, float(r))}}, {"d0": r})
        checkpoint.write_mirror(out, st)
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"round": r, "status": "baseline" if r == 0 else "ok"}) + "\n")
    s.db.execute("PRAGMA wal_autocheckpoint=0")  # a kill -9 before anything else: leave it as it is
    return out


def _truncate(p: Path, size: int) -> None:
    with p.open("r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("damage", ["db emptied, WAL gone", "db half", "db emptied, WAL kept", "WAL truncated"])
def test_a_damaged_store_refuses_to_start_and_names_the_file(tmp_path: Path, damage: str) -> None:
    out = _run_dir(tmp_path)
    db, wal = out / FILE, out / (FILE + "-wal")
    # Put the last round's state into the WAL only (as after a kill -9), then damage.
    s = Store(db)
    s.db.execute("PRAGMA wal_autocheckpoint=0")
    s.db.execute("BEGIN IMMEDIATE")
    s.db.execute("UPDATE meta SET value = value WHERE key = 'state'")
    s.db.execute("COMMIT")
    copies = {p.name: p.read_bytes() for p in (db, wal) if p.exists()}
    s.db.close()
    for name, data in copies.items():
        (out / name).write_bytes(data)
    if damage == "db emptied, WAL gone":
        _truncate(db, 0)
        wal.unlink(missing_ok=True)
    elif damage == "db half":
        _truncate(db, db.stat().st_size // 2)
        wal.unlink(missing_ok=True)
    elif damage == "db emptied, WAL kept":
        _truncate(db, 0)
    else:
        _truncate(db, 0)
        wal.write_bytes(copies.get(wal.name, b"")[: 100])
    with pytest.raises(StoreError) as e:
        checkpoint.open_store(out)
    msg = str(e.value)
    assert str(db) in msg and "\n" not in msg and ("fl-agg restore" in msg or "not a readable" in msg), msg
    # Nothing was re-announced: a later, honest look at the files still finds round 3 the last.
    assert store_check.rounds_seen(out) == 3


def test_a_store_behind_the_files_is_refused(tmp_path: Path) -> None:
    """A copy of the db file alone from before round 3 (no WAL), put back: SQLite reads it as a
    store at round 2, and metrics.jsonl says round 3 was applied."""
    out = _run_dir(tmp_path, rounds=2)
    Store(out / FILE).checkpoint_wal()
    old = (out / FILE).read_bytes()
    s = Store(out / FILE)
    d = checkpoint.checkpoint_dir(out, 3)
    d.mkdir()
    s.mark_announced(3, {})
    s.commit_round(RoundState(3, 3, str(d)), {}, {})
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"round": 3, "status": "ok"}) + "\n")
    s.close()
    for suffix in ("-wal", "-shm"):
        (out / (FILE + suffix)).unlink(missing_ok=True)
    (out / FILE).write_bytes(old)
    with pytest.raises(StoreError, match="is at round 2, but metrics.jsonl records round 3 as applied"):
        checkpoint.open_store(out)


def test_each_round_boundary_leaves_the_db_file_complete(tmp_path: Path) -> None:
    out = _run_dir(tmp_path)
    wal = out / (FILE + "-wal")
    s = Store(out / FILE)
    s.mark_announced(4, {"d0": 9})
    assert not wal.exists() or wal.stat().st_size == 0  # folded into the file at the commit
    copy = tmp_path / "copy.db"
    shutil.copy2(out / FILE, copy)  # the file alone, as a naive backup takes it
    c = Store(copy, create=False)
    assert c.announced() == 4 and c.state().round == 3 and c.replay_counters() == {"d0": 9}  # type: ignore[union-attr]


def test_a_fresh_start_is_explicit_and_numbers_rounds_after_everything_seen(tmp_path: Path) -> None:
    out = _run_dir(tmp_path)
    _truncate(out / FILE, 0)
    (out / (FILE + "-wal")).unlink(missing_ok=True)
    with pytest.raises(StoreError):
        checkpoint.open_store(out)
    s = checkpoint.open_store(out, fresh=True)
    assert s.state() is None and s.announced() == 3 and s.restored_over() == 3
    assert checkpoint.next_round(0, s.announced()) == 4  # devices that saw round 3 accept round 4
    assert list(out.glob(f"{FILE}.set-aside-*/{FILE}"))  # the damaged file is kept, aside


def test_a_backup_of_a_running_store_restores_the_same_state(tmp_path: Path) -> None:
    out = _run_dir(tmp_path)
    live = Store(out / FILE)  # the aggregator still has it open and keeps committing
    info = backup.backup(out, tmp_path / "bk")
    live.mark_announced(4, {"d0": 4})
    assert info["round"] == 3 and (tmp_path / "bk" / "checkpoints" / "student" / "round_0003").is_dir()
    live.close()
    # Now the store is lost, and the backup is put back.
    _truncate(out / FILE, 0)
    (out / (FILE + "-wal")).unlink(missing_ok=True)
    shutil.rmtree(checkpoint.checkpoint_dir(out, 3))
    done = backup.restore(tmp_path / "bk", out)
    s = checkpoint.open_store(out)
    st = s.state()
    assert st is not None and (st.round, st.version) == (3, 3)
    np.testing.assert_array_equal(s.arrays("optimizer")["m"], np.full(4, 3.0))
    assert s.replay_counters() == {"d0": 3}
    assert Path(st.checkpoint) == checkpoint.checkpoint_dir(out, 3) and (Path(st.checkpoint) / "adapter_model.safetensors").exists()
    assert s.announced() >= 3 and done["rounds_continue_after"] == 3


def test_a_damaged_backup_is_refused_before_anything_is_touched(tmp_path: Path) -> None:
    out = _run_dir(tmp_path)
    backup.backup(out, tmp_path / "bk")
    _truncate(tmp_path / "bk" / FILE, 100)
    before = (out / FILE).read_bytes()
    with pytest.raises(StoreError):
        backup.restore(tmp_path / "bk", out)
    assert (out / FILE).read_bytes() == before
    with pytest.raises(StoreError, match="not empty"):
        backup.backup(out, tmp_path / "bk")


def test_a_full_disk_or_a_read_only_store_is_one_line_and_the_store_is_intact(tmp_path: Path) -> None:
    out = _run_dir(tmp_path)
    s = Store(out / FILE)
    pages = s.db.execute("PRAGMA page_count").fetchone()[0]
    s.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "database or disk is full"
    with pytest.raises(StoreError, match="disk is full or the store is read-only") as e:
        s.commit_round(RoundState(4, 4, "/x"), {"optimizer": {"m": np.zeros(100_000)}}, {"d0": 4})
    assert "\n" not in str(e.value)
    s.close()
    s = Store(out / FILE)
    assert s.state().round == 3  # type: ignore[union-attr]
    s.close()
    ro = sqlite3.connect(f"file:{out / FILE}?mode=ro", uri=True, isolation_level=None)
    s = Store.__new__(Store)
    s.path, s.db = out / FILE, ro
    with pytest.raises(StoreError, match="read-only"):
        s.mark_announced(5, {})
    ro.close()
    assert Store(out / FILE).announced() == 3
