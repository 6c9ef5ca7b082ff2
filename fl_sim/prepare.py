"""Lay out a simulation directory: models, per-device private shards, held-out sets, configs."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fl_sim import partition, tasks
from shared.datasets import Example, load_file, write_jsonl

log = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.1  # of a user's file, kept for evaluation and never trained on


@dataclass(frozen=True)
class SimData:
    shards: list[list[Example]]  # one per device
    heldout: dict[str, list[Example]]  # family -> examples
    corpus: list[str]  # text the tokenizer is trained on


def generated(n_devices: int, per_family: int, eval_per_family: int, split: str, alpha: float, seed: int) -> SimData:
    train = [e for f in tasks.PRIVATE_FAMILIES for e in tasks.generate(f, per_family, seed)]
    if split == "family":
        shards = partition.split_by_family(train, n_devices)
    else:
        shards = partition.split_dirichlet(train, n_devices, alpha, seed)
    held = {f: tasks.heldout(f, eval_per_family, seed, train) for f in tasks.PRIVATE_FAMILIES}
    return SimData(shards, held, [e.prompt + e.output for e in train])


def user_data(path: Path, n_devices: int, seed: int) -> SimData:
    """A directory (one file per device) or one file split across devices; 10% of each held out."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if len(files) != n_devices:
            raise ValueError(f"--data {path} has {len(files)} files but --devices is {n_devices}: give one file per device")
        per_file = [load_file(f, family=f.stem) for f in files]
        per_file = [[Example(e.instruction, e.input, e.output, f.stem) for e in exs] for f, exs in zip(files, per_file)]
    else:
        exs = load_file(path, family=path.stem)
        per_file = [[Example(e.instruction, e.input, e.output, path.stem) for e in exs]]
    shards: list[list[Example]] = []
    held: dict[str, list[Example]] = {}
    for exs in per_file:
        k = max(1, int(len(exs) * HELDOUT_FRACTION))
        if len(exs) - k < 1:
            raise ValueError(f"{exs[0].family}: {len(exs)} examples is too few to hold out {k} for evaluation")
        held.setdefault(exs[0].family, []).extend(exs[-k:])
        shards.append(exs[:-k])
    if len(shards) == 1 and n_devices > 1:
        shards = partition.split_even(shards[0], n_devices, seed)
    if any(not s for s in shards):
        raise ValueError(f"not enough examples to give each of {n_devices} devices at least one")
    corpus = [e.prompt + e.output for s in shards for e in s]
    return SimData(shards, held, corpus)


def public_examples(n: int, seed: int) -> list[Example]:
    """Public (non-private) prompts: they teach the offline base the format."""
    return [e for f in tasks.PUBLIC_FAMILIES for e in tasks.generate(f, n, seed + 1)]


def write_data(out: Path, data: SimData) -> tuple[list[Path], Path]:
    shard_paths = []
    for i, shard in enumerate(data.shards):
        p = out / "data" / f"device-{i}.jsonl"
        write_jsonl(p, shard)
        shard_paths.append(p)
    eval_dir = out / "data" / "eval"
    for fam, exs in data.heldout.items():
        write_jsonl(eval_dir / f"{fam}.jsonl", exs)
    return shard_paths, eval_dir


def write_json(path: Path, obj: dict) -> Path:
    """Configs may hold broker passwords: created 0600."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=2))
    return path
