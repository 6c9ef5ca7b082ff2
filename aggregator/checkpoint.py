"""The aggregator's durable state: the global adapter per round (PEFT format) and state.json."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class State:
    round: int  # last completed round (0 = initial adapter)
    checkpoint: str  # directory of the global adapter, PEFT save_pretrained format


def checkpoint_dir(out_dir: Path, rnd: int) -> Path:
    return out_dir / "checkpoints" / f"round_{rnd:04d}"


def save(out_dir: Path, rnd: int, peft_model: Any) -> State:
    """Write the adapter with PEFT's own save_pretrained, then atomically point state.json at it."""
    d = checkpoint_dir(out_dir, rnd)
    peft_model.save_pretrained(d)
    st = State(round=rnd, checkpoint=str(d))
    tmp = out_dir / "state.json.tmp"
    tmp.write_text(json.dumps(st.__dict__, indent=2))
    os.replace(tmp, out_dir / "state.json")
    return st


def load_state(out_dir: Path) -> State | None:
    p = out_dir / "state.json"
    if not p.exists():
        return None
    data = json.loads(p.read_text())
    return State(round=int(data["round"]), checkpoint=str(data["checkpoint"]))


def load_adapter(checkpoint: str | Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(Path(checkpoint) / "adapter_model.safetensors")))
