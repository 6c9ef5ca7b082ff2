"""``fl-agg backup`` and ``fl-agg restore``: a copy of the aggregator's state that can be trusted.

A backup is a directory: the store, copied with SQLite's online backup API (one committed state,
consistent while the aggregator runs and commits), the checkpoint directories that state names,
and ``backup.json`` saying what it holds. ``restore`` checks a backup (integrity, schema, a
state, its checkpoints) before anything of the live directory is touched, then moves the current
store aside (never deleting it), installs the copy, and records that the rounds the directory's
files already show are history: the restored aggregator numbers its rounds after them, since
devices refuse a round number they have seen.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from aggregator import store_check
from aggregator.checkpoint import checkpoint_dir
from aggregator.store import FILE as STORE_FILE
from aggregator.store import RoundState, Store, StoreError

log = logging.getLogger(__name__)

MANIFEST = "backup.json"


def _checkpoints(st: RoundState) -> list[tuple[str, Path]]:
    """(role, directory) of every checkpoint a state names."""
    out = [("student", Path(st.checkpoint))]
    if st.teacher_checkpoint:
        out.append(("teacher", Path(st.teacher_checkpoint)))
    return out


def backup(out_dir: Path, dest: Path) -> dict[str, Any]:
    """Copy ``out_dir``'s store and its current checkpoints into the new directory ``dest``."""
    if dest.exists() and any(dest.iterdir()):
        raise StoreError(f"{dest}: exists and is not empty; give a new directory for the backup")
    live = Store(out_dir / STORE_FILE, create=False)
    dest.mkdir(parents=True, exist_ok=True)
    live.backup(dest / STORE_FILE)
    live.close()
    copy = Store(dest / STORE_FILE, create=False)  # what was copied, read back: the state to match
    st, announced = copy.state(), copy.announced()
    copy.close()
    if st is None:
        raise StoreError(f"{out_dir / STORE_FILE}: holds no round state yet; nothing to back up")
    ckpts = {}
    for role, d in _checkpoints(st):
        # Each round writes its own directory and the aggregator never rewrites one, so this copy
        # is the committed adapter even if a later round commits meanwhile.
        shutil.copytree(d, dest / "checkpoints" / role / d.name)
        ckpts[role] = {"source": str(d), "copy": f"checkpoints/{role}/{d.name}"}
    info = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": str(out_dir), "round": st.round,
            "version": st.version, "announced": announced, "checkpoints": ckpts}
    (dest / MANIFEST).write_text(json.dumps(info, indent=2))
    return info


def verify(src: Path) -> dict[str, Any]:
    """What a backup holds, if it is whole; else StoreError naming what is wrong."""
    if not (src / MANIFEST).exists():
        raise StoreError(f"{src}: not a backup written by fl-agg backup (no {MANIFEST})")
    info = json.loads((src / MANIFEST).read_text())
    s = Store(src / STORE_FILE, create=False)
    st = s.state()
    s.close()
    if st is None or st.round != info.get("round"):
        raise StoreError(f"{src / STORE_FILE}: its state is not the round {info.get('round')} that {MANIFEST} says")
    for role, c in info["checkpoints"].items():
        if not (src / c["copy"] / "adapter_model.safetensors").exists():
            raise StoreError(f"{src}: the {role} checkpoint {c['copy']} is missing or incomplete")
    return info


def restore(src: Path, out_dir: Path) -> dict[str, Any]:
    """Make the backup ``src`` the store of ``out_dir`` (checked first; the old store moved aside)."""
    info = verify(src)
    seen = store_check.rounds_seen(out_dir)
    staged = out_dir / f".restore-{time.strftime('%Y%m%dT%H%M%S')}"
    staged.mkdir(parents=True)
    shutil.copy2(src / STORE_FILE, staged / STORE_FILE)
    s = Store(staged / STORE_FILE, create=False)
    st = s.state()
    assert st is not None  # verify() checked it
    moved = {}
    for role, c in info["checkpoints"].items():
        target = checkpoint_dir(out_dir, st.round, role)
        if not target.exists():
            shutil.copytree(src / c["copy"], target)
        moved[role] = str(target)
    # The state's pointers name this directory's copies (the backup may come from elsewhere).
    arrays = {n: s.arrays(n) for n in ("optimizer", "sparse")}
    s.commit_round(RoundState(st.round, st.version, moved["student"], moved.get("teacher")), arrays, s.replay_counters())
    s.mark_restored(max(seen, s.announced()))
    s.close()
    store_check.set_aside(out_dir)
    shutil.move(str(staged / STORE_FILE), str(out_dir / STORE_FILE))
    shutil.rmtree(staged, ignore_errors=True)
    log.info("restored round %d (version %d) from %s; rounds continue after %d", st.round, st.version, src, max(seen, st.round))
    return {**info, "rounds_continue_after": max(seen, st.round)}
