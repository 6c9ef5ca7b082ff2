"""A resumable checkpoint of the round the device is training (issue 13, lifecycle).

While it trains, the device writes ``WORK_DIR/train_checkpoint.safetensors`` at most every
``checkpoint_every_s`` seconds, atomically (temp file, fsync, rename, as ``edge_client.state``): the
tensors of ``fl_lm.train.TrainState`` (the adapter, AdamW's moments, torch's generator states) and
the round's announcement as it arrived, with everything else as JSON in the safetensors header.
No pickle: the file sits on a disk a user can reach, and safetensors holds raw buffers only.

What makes a checkpoint usable is decided by the client (``EdgeClient._resumable``): the round it
last accepted, its sequence counter unchanged since (no update was built for the round), the
round's deadline not passed, and the stored announcement still verifying under the pinned
aggregator key with the recorded digest. It is deleted once training finishes (the update is
built from the trained adapter; the outbox carries it from there) or when a later round is
announced. Secure-aggregation rounds are never checkpointed: their mask secrets live in memory
only, so a new process could not finish them anyway.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any

from fl_lm.train import TrainState
from shared import messages as M
from shared.datasets import Example

log = logging.getLogger(__name__)

FILE = "train_checkpoint.safetensors"
FORMAT = 1


@dataclass(frozen=True)
class Header:
    """What the checkpoint is of, fixed for the round.

    spec_digest: sha256 of the round's RoundSpec (``spec_digest``): another announcement with the
        same round number never resumes it.
    run_key: digest of the rest of what decides the run (``run_key``): a changed data file or
        training setting starts the round again instead of continuing another run.
    seq: the device's sequence counter when the round began; an update for the round moves it.
    received_at, deadline_s: wall-clock time the round began on the device and the round's
        deadline from then; past both, the aggregator has surely closed the round.
    announcement: the announcement's bytes as received (signed, unless insecure), verified again
        before a restarted process acts on it.
    """

    round: int
    spec_digest: str
    run_key: str
    seq: int
    received_at: float
    deadline_s: float
    announcement: bytes


@dataclass(frozen=True)
class Checkpoint:
    header: Header
    state: TrainState


def spec_digest(spec: M.RoundSpec) -> str:
    return hashlib.sha256(M.encode(spec)).hexdigest()


def run_key(*, steps: int, batch_size: int, max_len: int, lr: float, seed: int, examples: list[Example]) -> str:
    data = hashlib.sha256(json.dumps([astuple(e) for e in examples]).encode()).hexdigest()
    return hashlib.sha256(json.dumps([steps, batch_size, max_len, lr, seed, data]).encode()).hexdigest()


def save(work: Path, ck: Checkpoint) -> None:
    import torch
    from safetensors.torch import save_file

    h, s = ck.header, ck.state
    tensors: dict[str, Any] = {f"param/{k}": v for k, v in s.params.items()}
    tensors.update({f"moment/{k}": v for k, v in s.moments.items()})
    tensors.update({f"rng/{k}": v for k, v in s.rng.items()})
    tensors["announcement"] = torch.frombuffer(bytearray(h.announcement), dtype=torch.uint8)
    meta = {k: v for k, v in asdict(h).items() if k != "announcement"}
    meta.update(format=FORMAT, step=s.step, counts=s.counts, losses=list(s.losses))
    tmp = work / (FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"checkpoint": json.dumps(meta)})  # no second copy of it in memory
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, work / FILE)


def _typed(meta: dict[str, Any]) -> tuple[Header, int, dict[str, float], tuple[float, ...]]:
    if not isinstance(meta, dict):
        raise TypeError(f"metadata is {type(meta).__name__}, not a map")
    if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
    ints, floats, strs = ("round", "seq", "step"), ("received_at", "deadline_s"), ("spec_digest", "run_key")
    for k in ints:
        if not isinstance(meta[k], int) or isinstance(meta[k], bool):
            raise TypeError(f"{k} is {meta[k]!r}, not an integer")
    for k in floats:
        if not isinstance(meta[k], (int, float)) or isinstance(meta[k], bool):
            raise TypeError(f"{k} is {meta[k]!r}, not a number")
    for k in strs:
        if not isinstance(meta[k], str):
            raise TypeError(f"{k} is {meta[k]!r}, not a string")
    counts, losses = meta["counts"], meta["losses"]
    if not isinstance(counts, dict) or not all(isinstance(v, (int, float)) for v in counts.values()):
        raise TypeError("counts is not a map of numbers")
    if not isinstance(losses, list) or not all(isinstance(v, (int, float)) for v in losses):
        raise TypeError("losses is not a list of numbers")
    header = Header(round=meta["round"], spec_digest=meta["spec_digest"], run_key=meta["run_key"], seq=meta["seq"],
                    received_at=float(meta["received_at"]), deadline_s=float(meta["deadline_s"]), announcement=b"")
    return header, meta["step"], {str(k): float(v) for k, v in counts.items()}, tuple(float(v) for v in losses)


def load(work: Path) -> Checkpoint | None:
    """The checkpoint, or None: none was written, or it cannot be read (one warning; it is removed,
    and the round starts from step 0 if it goes on at all)."""
    from safetensors import SafetensorError, safe_open

    p = work / FILE
    if not p.exists():
        return None
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        header, step, counts, losses = _typed(json.loads(meta["checkpoint"]))
        ann = tensors.pop("announcement")
        header = Header(**{**asdict(header), "announcement": ann.numpy().tobytes()})

        def part(prefix: str) -> dict[str, Any]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        state = TrainState(step=step, params=part("param/"), moments=part("moment/"), counts=counts, rng=part("rng/"),
                           losses=losses)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        log.warning("ignoring unreadable training checkpoint %s (%s: %s); the round starts again from step 0",
                    p, type(e).__name__, e)
        p.unlink(missing_ok=True)
        return None
    return Checkpoint(header, state)


def discard(work: Path) -> bool:
    """Remove the checkpoint; True if there was one."""
    p = work / FILE
    (work / (FILE + ".tmp")).unlink(missing_ok=True)
    if not p.exists():
        return False
    p.unlink()
    return True


class Writer:
    """``fl_lm.train``'s ``after_step`` hook: a checkpoint at most every ``every_s`` seconds of
    training (0: after every step). Timed from the end of the last write, so writes of W seconds
    cost at most W / (every_s + W) of the training time however slow the disk is."""

    def __init__(self, work: Path, header: Header, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.work, self.header, self.every_s, self.clock = work, header, every_s, clock
        self.last = clock()
        self.written = 0

    def __call__(self, step: int, snapshot: Callable[[], TrainState]) -> None:
        if self.clock() - self.last < self.every_s:
            return
        t0 = self.clock()
        save(self.work, Checkpoint(self.header, snapshot()))
        self.last = self.clock()
        self.written += 1
        log.debug("round %d: training checkpoint at step %d (%.2fs)", self.header.round, step, self.last - t0)
