"""The aggregator's durable round state, in one SQLite file committed a transaction at a time.

Why SQLite: a restart must find either the state before a round or the state after it, never half
of each. Before, the adapter pointer (state.json), the server optimizer's moments, the sparse
planner's scores and the announced round were separate files replaced one after another: a crash
between two of them resumed a new adapter with old optimizer state. SQLite (stdlib ``sqlite3``,
no server, one file beside the checkpoints, WAL journal, ``synchronous=FULL``) makes the whole
boundary one commit, and it is what Flower's SuperLink keeps its state in. The adapters themselves
stay PEFT directories on disk (``checkpoint.py``): they are written first, under a new round's
name, and only the commit makes them current.

What is kept:
- ``meta``: the last announced round (committed *before* anyone hears of it), the last completed
  round, how many rounds changed the model (``version``), the current adapter directories.
- ``arrays``: the server optimizer's state, the planner's scores and sketch, as ``.npz`` bytes
  (numpy without pickles).
- ``replay``: the highest message sequence number accepted from each device. Committed at each
  round boundary: a message accepted after the last commit belongs to a round that the crash
  interrupted, and that round's number is refused after a restart anyway.
- ``phases``: each round's phase boundaries (announced, applied, abandoned), for the operator.
- ``releases`` and ``deliveries``: each release as due (before it is built), built (its id and
  signed manifest) or skipped (why), and per device what became of it (installed, refused, no
  answer). A restart rebuilds a release that was due and never built and resends the latest to
  every device that lacks it (issue 23: before, a release was sent once and forgotten).

The enrolled-device registry stays the operator's file (``fl-agg enroll``): the service only
reads it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from shared.errors import ConfigError

log = logging.getLogger(__name__)

FILE = "aggregator.db"
SCHEMA = 1

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS arrays (name TEXT PRIMARY KEY, npz BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS replay (device TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS phases (round INTEGER NOT NULL, phase TEXT NOT NULL, at REAL NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (seq INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, state TEXT NOT NULL,
                                     release_id TEXT, manifest BLOB, at REAL NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries (release_id TEXT NOT NULL, device TEXT NOT NULL, status TEXT NOT NULL, at REAL NOT NULL,
                                       PRIMARY KEY (release_id, device));
"""


class StoreError(ConfigError):
    """The state file is unreadable or from another schema; the message names the file (one line at the CLI)."""


@dataclass(frozen=True)
class ReleaseRow:
    """One release the store knows of: ``due`` (to build, from round ``round``'s model), ``built``
    (``release_id`` and its signed ``manifest``: what a resend sends) or ``skipped`` (``detail``)."""

    seq: int
    round: int
    state: str
    release_id: str | None
    manifest: bytes | None
    detail: str


@dataclass(frozen=True)
class RoundState:
    round: int  # last completed round (0 = initial adapter)
    version: int  # how many rounds changed the model (a round that was abandoned does not)
    checkpoint: str  # directory of the global (student) adapter, PEFT save_pretrained format
    teacher_checkpoint: str | None = None  # the teacher's adapter, when a mode trains one


def _npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **dict(arrays))
    return buf.getvalue()


def _unnpz(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class Store:
    """``create``: a new file may be made here; an existing one must already hold state.

    SQLite opens a truncated or emptied file without a word, as an empty database, and a
    truncated WAL loses its frames silently: an aggregator that then created its tables afresh
    re-announced round 1 to devices that had seen round 3 (issue 23). So an existing file is
    checked (``PRAGMA quick_check``, the schema, a state) before anything is written to it.
    """

    def __init__(self, path: Path, create: bool = True) -> None:
        self.path = Path(path)
        existed = self.path.exists()
        if not existed and not create:
            raise StoreError(f"{self.path}: no such aggregator state file")
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) below.
            self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            if existed:
                self._check_existing()
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_TABLES)
            v = self._meta("schema")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a readable aggregator state file ({e})") from e
        if v is None:
            self._set_meta({"schema": str(SCHEMA)})
        elif int(v) != SCHEMA:
            raise StoreError(f"{self.path}: state schema {v}, this aggregator reads schema {SCHEMA}")

    def _check_existing(self) -> None:
        """An existing file must be whole and hold this aggregator's state; else StoreError."""
        ok = self.db.execute("PRAGMA quick_check").fetchone()
        if ok is None or ok[0] != "ok":
            raise StoreError(f"{self.path}: fails SQLite's integrity check ({ok[0] if ok else 'no answer'}); restore a "
                             "backup (fl-agg restore) or start a new store explicitly (fl-agg run --fresh)")
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "meta" not in tables or self._meta("schema") is None:
            raise StoreError(f"{self.path}: exists but holds no aggregator state (emptied, truncated, or its WAL lost); "
                             "restore a backup (fl-agg restore) or start a new store explicitly (fl-agg run --fresh)")

    # -- reads ----------------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def announced(self) -> int:
        """The last round number ever announced (0: none)."""
        return int(self._meta("announced") or 0)

    def restored_over(self) -> int:
        """The highest round the files recorded when this store was restored or started afresh
        (``fl-agg restore``, ``--fresh``); rounds up to it are history the store does not hold."""
        return int(self._meta("restored_over") or 0)

    def state(self) -> RoundState | None:
        raw = self._meta("state")
        if raw is None:
            return None
        d = json.loads(raw)
        return RoundState(round=int(d["round"]), version=int(d["version"]), checkpoint=str(d["checkpoint"]),
                          teacher_checkpoint=d.get("teacher_checkpoint") or None)

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        row = self.db.execute("SELECT npz FROM arrays WHERE name = ?", (name,)).fetchone()
        return {} if row is None else _unnpz(row[0])

    def replay_counters(self) -> dict[str, int]:
        return {str(d): int(s) for d, s in self.db.execute("SELECT device, seq FROM replay")}

    def phases(self, rnd: int | None = None) -> list[tuple[int, str, str]]:
        q = "SELECT round, phase, detail FROM phases" + (" WHERE round = ?" if rnd is not None else "") + " ORDER BY rowid"
        return [(int(r), str(p), str(d)) for r, p, d in self.db.execute(q, () if rnd is None else (rnd,))]

    def releases(self) -> list[ReleaseRow]:
        rows = self.db.execute("SELECT seq, round, state, release_id, manifest, detail FROM releases ORDER BY seq")
        return [ReleaseRow(int(q), int(r), str(st), rid, None if m is None else bytes(m), str(d)) for q, r, st, rid, m, d in rows]

    def latest_release(self) -> ReleaseRow | None:
        """The last release built (a rollback counts: its re-signed manifest is what devices need)."""
        built = [r for r in self.releases() if r.state == "built"]
        return built[-1] if built else None

    def due_release(self) -> ReleaseRow | None:
        """A release marked due and neither built nor skipped since: the aggregator stopped while building it."""
        rows = self.releases()
        return rows[-1] if rows and rows[-1].state == "due" else None

    def deliveries(self, release_id: str) -> dict[str, str]:
        """Device -> what became of ``release_id`` on it (installed, refused: why, no answer)."""
        return {str(d): str(s) for d, s in self.db.execute("SELECT device, status FROM deliveries WHERE release_id = ?",
                                                            (release_id,))}

    # -- writes: each one transaction -----------------------------------------------------------
    def _set_meta(self, kv: Mapping[str, str]) -> None:
        self.db.executemany("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                            list(kv.items()))

    def mark_announced(self, rnd: int, replay: Mapping[str, int]) -> None:
        """Durably, before the announcement goes out: devices refuse a round number they have
        seen, so a restarted aggregator must never announce ``rnd`` again."""
        with self._tx():
            self._set_meta({"announced": str(rnd)})
            self._put_replay(replay)
            self._phase(rnd, "announced", "")

    def commit_round(self, st: RoundState, arrays: Mapping[str, Mapping[str, np.ndarray]], replay: Mapping[str, int]) -> None:
        """The round's result becomes current: adapter pointers, version, arrays and counters together."""
        with self._tx():
            self._set_meta({"state": json.dumps({"round": st.round, "version": st.version, "checkpoint": st.checkpoint,
                                                 "teacher_checkpoint": st.teacher_checkpoint})})
            self.db.executemany("INSERT INTO arrays(name, npz) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET npz = excluded.npz",
                                [(k, _npz(v)) for k, v in arrays.items()])
            self._put_replay(replay)
            self._phase(st.round, "applied", f"version {st.version}")

    def mark_restored(self, over: int) -> None:
        """After a restore or a fresh start: never announce a round number up to ``over`` again
        (devices refuse one they have seen), and let the files' records up to it stand."""
        with self._tx():
            self._set_meta({"restored_over": str(over), "announced": str(max(over, self.announced()))})
            self._phase(over, "restored", "")

    def abandon(self, rnd: int, reason: str, replay: Mapping[str, int]) -> None:
        with self._tx():
            self._put_replay(replay)
            self._phase(rnd, "abandoned", reason)

    def release_due(self, rnd: int) -> None:
        """Before a release is built: a restart then knows one was owed if the build never finished."""
        with self._tx():
            self.db.execute("INSERT INTO releases(round, state, at, detail) VALUES(?, 'due', ?, '')", (rnd, time.time()))

    def release_built(self, rnd: int, release_id: str, manifest: bytes, detail: str = "") -> None:
        """The release is signed and in place: the due row (if any) becomes built, in one commit."""
        with self._tx():
            self._close_due(rnd, "superseded")
            self.db.execute("INSERT INTO releases(round, state, release_id, manifest, at, detail) VALUES(?, 'built', ?, ?, ?, ?)",
                            (rnd, release_id, manifest, time.time(), detail))

    def release_skipped(self, rnd: int, reason: str) -> None:
        with self._tx():
            self._close_due(rnd, "superseded")
            self.db.execute("INSERT INTO releases(round, state, at, detail) VALUES(?, 'skipped', ?, ?)", (rnd, time.time(), reason))

    def _close_due(self, rnd: int, why: str) -> None:
        # A due row is closed by what came of it (the row after it says what), so it never stays open.
        self.db.execute("UPDATE releases SET state = 'closed', detail = ? WHERE state = 'due' AND round <= ?", (why, rnd))

    def delivered(self, release_id: str, outcome: Mapping[str, str]) -> None:
        """What each device answered for ``release_id``: ``installed``, ``refused: why``, ``no answer``."""
        with self._tx():
            self.db.executemany("INSERT INTO deliveries(release_id, device, status, at) VALUES(?, ?, ?, ?) ON CONFLICT"
                                "(release_id, device) DO UPDATE SET status = excluded.status, at = excluded.at",
                                [(release_id, d, st, time.time()) for d, st in outcome.items()])

    def _put_replay(self, replay: Mapping[str, int]) -> None:
        # Only ever up: a counter that went down would let an old message through again.
        self.db.executemany("INSERT INTO replay(device, seq) VALUES(?, ?) ON CONFLICT(device) DO UPDATE SET seq = "
                            "MAX(seq, excluded.seq)", list(replay.items()))

    def _phase(self, rnd: int, phase: str, detail: str) -> None:
        self.db.execute("INSERT INTO phases(round, phase, at, detail) VALUES(?, ?, ?, ?)", (rnd, phase, time.time(), detail))

    def _tx(self) -> _Tx:
        return _Tx(self.db)

    def checkpoint_wal(self) -> None:
        """Fold the WAL into the main file (and empty it): the db file alone is then complete. Run
        at each round boundary; after a kill -9 nearly all of the state sat in the WAL (132 KiB
        of WAL beside a 4 KiB file), so a copy of the file alone was no backup."""
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def backup(self, dest: Path) -> None:
        """A consistent copy of the store, taken with SQLite's online backup API (safe while the
        running aggregator writes: the copy is of one committed state)."""
        out = sqlite3.connect(str(dest))
        try:
            self.db.backup(out)
        finally:
            out.close()

    def close(self) -> None:
        self.db.close()


def _cannot_write(err: Exception) -> StoreError:
    # A full disk or a read-only file: the transaction did not happen and the store keeps the last
    # committed state. One line for the operator, not a traceback.
    return StoreError(f"the aggregator's store could not commit ({err}): the disk is full or the store is read-only; "
                      "it keeps its last committed round")


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            raise _cannot_write(err) from None

    def __exit__(self, et: object, e: object, tb: object) -> None:
        if et is None:
            try:
                self.db.execute("COMMIT")
            except sqlite3.OperationalError as err:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                raise _cannot_write(err) from None
            # Each round boundary leaves the db file complete on its own (see Store.checkpoint_wal).
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("ROLLBACK")
        if isinstance(e, sqlite3.OperationalError):
            raise _cannot_write(e) from None
