"""The aggregator's checkpoints: the global adapter per round (PEFT format), made current by the store.

Adapters are written first, each round into its own directory, then ``store.Store.commit_round``
makes them current together with the optimizer state, the planner's arrays and the replay
counters, in one transaction: a restart resumes from the last completed round, whole.
``state.json`` is a copy of the committed pointer for people and scripts; nothing reads it back.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.store import FILE as STORE_FILE
from aggregator.store import RoundState, Store, StoreError

log = logging.getLogger(__name__)

MIRROR = "state.json"
# Files of the aggregator before the store (one file each, replaced one after another).
_LEGACY = {"announced": "announced.json", "optimizer": "server_optimizer.npz", "scores": "sparse_scores.npy",
           "sketch": "sparse_sketch.npy"}
# What forget_old_fleet removes: the last fleet's progress (SQLite's WAL files included).
RUN_STATE = (MIRROR, STORE_FILE, STORE_FILE + "-wal", STORE_FILE + "-shm", *_LEGACY.values())


def checkpoint_dir(out_dir: Path, rnd: int, model: str = "student") -> Path:
    base = out_dir / "checkpoints"
    return (base if model == "student" else base / model) / f"round_{rnd:04d}"


def save_adapters(out_dir: Path, rnd: int, peft_model: Any, teacher: Any = None) -> tuple[str, str | None]:
    """Write the adapters with PEFT's own save_pretrained; they are not current until committed."""
    from fl_lm.lora import save as save_adapter

    d = checkpoint_dir(out_dir, rnd)
    save_adapter(peft_model, d)
    td = None
    if teacher is not None:
        td = checkpoint_dir(out_dir, rnd, "teacher")
        save_adapter(teacher, td)
    return str(d), str(td) if td else None


def write_mirror(out_dir: Path, st: RoundState) -> None:
    tmp = out_dir / (MIRROR + ".tmp")
    tmp.write_text(json.dumps(asdict(st), indent=2))
    os.replace(tmp, out_dir / MIRROR)


def open_store(out_dir: Path, fresh: bool = False) -> Store:
    """The store in ``out_dir``, checked against the files its rounds wrote (``store_check``); a
    directory from before the store is imported into it once.

    ``fresh``: the old store (if any) is moved aside and a new one begins from the initial
    adapter, numbering its rounds above every round the directory records (devices refuse a
    number they have seen). Only on an operator's explicit word (``fl-agg run --fresh``)."""
    from aggregator import store_check

    path = out_dir / STORE_FILE
    if fresh:
        store_check.set_aside(out_dir)
        store = Store(path)
        seen = store_check.rounds_seen(out_dir)
        if seen:
            store.mark_restored(seen)
            log.warning("a NEW store (--fresh): the trained model of the old one is not resumed; rounds are numbered "
                        "from %d, after every round %s records", seen + 1, out_dir)
        return store
    if not path.exists():
        if (out_dir / _LEGACY["announced"]).exists() and (out_dir / MIRROR).exists():
            store = Store(path)
            _import_legacy(out_dir, store)
            return store
        if store_check.rounds_seen(out_dir) and ((out_dir / MIRROR).exists() or (out_dir / store_check.METRICS).exists()):
            raise StoreError(f"{path}: missing, but {out_dir} records rounds up to {store_check.rounds_seen(out_dir)}; "
                             f"{store_check.FIX}")
    store = Store(path)
    store_check.check(out_dir, store)
    return store


def _import_legacy(out_dir: Path, store: Store) -> None:
    d = json.loads((out_dir / MIRROR).read_text())
    st = RoundState(round=int(d["round"]), version=int(d.get("version", d["round"])), checkpoint=str(d["checkpoint"]),
                    teacher_checkpoint=d.get("teacher_checkpoint") or None)
    arrays: dict[str, dict[str, np.ndarray]] = {}
    opt = out_dir / _LEGACY["optimizer"]
    if opt.exists():
        with np.load(opt, allow_pickle=False) as z:
            arrays["optimizer"] = {k: z[k] for k in z.files}
    sp = {k: np.load(out_dir / _LEGACY[k], allow_pickle=False) for k in ("scores", "sketch") if (out_dir / _LEGACY[k]).exists()}
    if sp:
        arrays["sparse"] = sp
    store.commit_round(st, arrays, {})
    ann = out_dir / _LEGACY["announced"]
    if ann.exists():
        store.mark_announced(int(json.loads(ann.read_text())["round"]), {})
    log.info("imported the aggregator state of %s (round %d) into %s", out_dir, st.round, store.path)


def next_round(completed: int, announced: int) -> int:
    """The first round number a (re)started aggregator may announce."""
    return max(completed, announced) + 1


def load_adapter(checkpoint: str | Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(Path(checkpoint) / "adapter_model.safetensors")))
