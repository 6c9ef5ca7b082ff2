"""The aggregator's durable state: the global adapter per round (PEFT format) and state.json.

``state.json`` is replaced atomically after every checkpoint, so a restart resumes from the last
completed round: the student's adapter, the teacher's adapter (distillation modes), the server
optimizer's state and the sparse planner's scores.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class State:
    round: int  # last completed round (0 = initial adapter)
    checkpoint: str  # directory of the global (student) adapter, PEFT save_pretrained format
    teacher_checkpoint: str | None = None  # the teacher's adapter, when a mode trains one


def checkpoint_dir(out_dir: Path, rnd: int, model: str = "student") -> Path:
    base = out_dir / "checkpoints"
    return (base if model == "student" else base / model) / f"round_{rnd:04d}"


def save(out_dir: Path, rnd: int, peft_model: Any, teacher: Any = None) -> State:
    """Write the adapters with PEFT's own save_pretrained, then atomically point state.json at them."""
    from fl_lm.lora import save as save_adapter

    d = checkpoint_dir(out_dir, rnd)
    save_adapter(peft_model, d)
    td = None
    if teacher is not None:
        td = checkpoint_dir(out_dir, rnd, "teacher")
        save_adapter(teacher, td)
    st = State(round=rnd, checkpoint=str(d), teacher_checkpoint=str(td) if td else None)
    tmp = out_dir / "state.json.tmp"
    tmp.write_text(json.dumps(asdict(st), indent=2))
    os.replace(tmp, out_dir / "state.json")
    return st


def load_state(out_dir: Path) -> State | None:
    p = out_dir / "state.json"
    if not p.exists():
        return None
    data = json.loads(p.read_text())
    tc = data.get("teacher_checkpoint")
    return State(round=int(data["round"]), checkpoint=str(data["checkpoint"]), teacher_checkpoint=str(tc) if tc else None)


ANNOUNCED = "announced.json"


def mark_announced(out_dir: Path, rnd: int) -> None:
    """Record, durably and before anyone hears of it, that round ``rnd`` is being announced.

    Devices refuse a round number they have seen (a replay), so a restarted aggregator must never
    announce one again: the masked sum and the devices' secrets of an interrupted round are gone,
    so that round is abandoned and the next number is used instead.
    """
    tmp = out_dir / (ANNOUNCED + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps({"round": rnd}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / ANNOUNCED)


def last_announced(out_dir: Path) -> int:
    p = out_dir / ANNOUNCED
    if not p.exists():
        return 0
    try:
        return int(json.loads(p.read_text())["round"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{p} is corrupt ({e}); it must hold the last announced round") from e


def next_round(completed: int, announced: int) -> int:
    """The first round number a (re)started aggregator may announce."""
    return max(completed, announced) + 1


def load_adapter(checkpoint: str | Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(Path(checkpoint) / "adapter_model.safetensors")))


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Optimizer or planner state as .npz (no pickles), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
