"""Whether the aggregator's store agrees with the files its rounds left beside it.

A store can be whole to SQLite and still not be the aggregator's latest state: a truncated WAL
drops the last frames without an error, and a copy of the db file alone (without its WAL) is an
older state. Started on such a store, the aggregator resumed from round 0 while the devices had
seen round 3, re-announced rounds they refused, and threw the trained model away (issue 23). So
at start the store is compared with what the rounds also wrote: ``metrics.jsonl`` (one record
per round, written after the round's commit), ``state.json`` (a copy of the committed pointer)
and the checkpoint directory it names. Any disagreement stops the aggregator with one line.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

from aggregator.store import FILE as STORE_FILE
from aggregator.store import Store, StoreError

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
MIRROR = "state.json"
_ROUND_DIR = re.compile(r"round_(\d{4,})$")
FIX = "restore a backup (fl-agg restore BACKUP --config ...) or start a new store explicitly (fl-agg run --fresh)"


def _records(out_dir: Path) -> list[dict]:
    p = out_dir / METRICS
    if not p.exists():
        return []
    out = []
    for line in p.read_text(errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a last line cut by a crash says nothing about the store
        if isinstance(r, dict) and isinstance(r.get("round"), int):
            out.append(r)
    return out


def _mirror_round(out_dir: Path) -> int | None:
    p = out_dir / MIRROR
    try:
        return int(json.loads(p.read_text())["round"]) if p.exists() else None
    except (ValueError, KeyError, TypeError, OSError):
        return None


def rounds_seen(out_dir: Path) -> int:
    """The highest round number any file in ``out_dir`` records: what devices may have seen."""
    recs = _records(out_dir)
    seen = max([r["round"] for r in recs] + [_mirror_round(out_dir) or 0])
    ck = out_dir / "checkpoints"
    if ck.is_dir():
        seen = max([seen] + [int(m.group(1)) for p in ck.iterdir() if (m := _ROUND_DIR.search(p.name))])
    return seen


def check(out_dir: Path, store: Store) -> None:
    """StoreError, in one line naming the file and what disagrees, unless the store is the state
    the other files describe (it may be ahead of them: a commit comes before its record)."""
    st, announced = store.state(), store.announced()
    recs = _records(out_dir)
    restored_over = store.restored_over()
    applied = max((r["round"] for r in recs if r.get("status") == "ok" and r["round"] > restored_over), default=0)
    recorded = max((r["round"] for r in recs if r.get("status") != "baseline"), default=0)
    mirror = _mirror_round(out_dir)
    problems = []
    if st is None:
        if recorded or mirror:
            problems.append(f"it holds no round state, but {METRICS if recorded else MIRROR} records round "
                            f"{recorded or mirror}")
    else:
        if st.round < applied:
            problems.append(f"it is at round {st.round}, but {METRICS} records round {applied} as applied")
        if mirror is not None and mirror > max(st.round, restored_over):
            problems.append(f"it is at round {st.round}, but {MIRROR} says round {mirror}")
        for ck in (st.checkpoint, st.teacher_checkpoint):
            if ck and not Path(ck).is_dir():
                problems.append(f"the checkpoint it names, {ck}, does not exist")
    if announced < recorded:
        problems.append(f"its last announced round is {announced}, but {METRICS} records round {recorded}")
    if problems:
        raise StoreError(f"{store.path}: {'; '.join(problems)}; {FIX}")


def set_aside(out_dir: Path) -> Path | None:
    """Move the store (and its WAL) out of the way, never deleting it: it may still be evidence."""
    db = out_dir / STORE_FILE
    if not db.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = out_dir / f"{STORE_FILE}.set-aside-{stamp}"
    target.mkdir()
    for suffix in ("", "-wal", "-shm"):
        f = out_dir / (STORE_FILE + suffix)
        if f.exists():
            shutil.move(str(f), str(target / f.name))
    log.warning("moved the aggregator's store %s aside, to %s", db, target)
    return target
