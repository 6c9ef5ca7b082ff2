"""Lay out a simulation directory: models, per-device private shards, held-out sets, configs."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fl_sim import partition, tasks
from shared.datasets import Example, load_file, write_jsonl

log = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.1  # of a user's file, kept for evaluation and never trained on
PUBLIC_FRACTION = 0.1  # of a user's file, held by the aggregator only: its public set
PUBLIC_PER_FAMILY = 1500  # generated public-family examples the aggregator holds (fewer: the bases memorize them)
PUBLIC_SLICE = 20  # generated examples per private family that no device holds, in the public set


@dataclass(frozen=True)
class SimData:
    shards: list[list[Example]]  # one per device: private
    heldout: dict[str, list[Example]]  # family -> held-out examples of the devices' families
    public: list[Example]  # the aggregator's public set (distillation, base pretraining)
    public_heldout: dict[str, list[Example]]  # family -> held-out examples of the public families

    @property
    def corpus(self) -> list[str]:
        """Text the offline tokenizer and bases are built from: public data only, never a shard."""
        return [e.prompt + e.output for e in self.public]


def generated(n_devices: int, per_family: int, eval_per_family: int, split: str, alpha: float, seed: int) -> SimData:
    train = [e for f in tasks.PRIVATE_FAMILIES for e in tasks.generate(f, per_family, seed)]
    if split == "family":
        shards = partition.split_by_family(train, n_devices)
    else:
        shards = partition.split_dirichlet(train, n_devices, alpha, seed)
    public = public_examples(PUBLIC_PER_FAMILY, seed, exclude=train)
    held = {f: tasks.heldout(f, eval_per_family, seed, train + public) for f in tasks.PRIVATE_FAMILIES}
    pub_held = {f: tasks.heldout(f, eval_per_family, seed, public) for f in tasks.PUBLIC_FAMILIES}
    return SimData(shards, held, public, pub_held)


def _families(path: Path, encoding: str | None = None) -> dict[str, list[Example]]:
    """A file (one family, or the ``family`` field of each record), or a directory of them (a family per file)."""
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    out: dict[str, list[Example]] = {}
    for f in files:
        for e in load_file(f, family=f.stem, encoding=encoding):
            out.setdefault(e.family, []).append(e)
    return out


def laid_out(shards_dir: Path, public: Path, eval_data: Path, public_eval: Path | None, n_devices: int,
             encoding: str | None = None) -> SimData:
    """Data already split: one file per device, the aggregator's public set and held-out sets."""
    files = sorted(p for p in shards_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if len(files) != n_devices:
        raise ValueError(f"--data {shards_dir} has {len(files)} files but --devices is {n_devices}: give one file per device")
    shards = [load_file(f, encoding=encoding) for f in files]
    return SimData(shards, _families(eval_data, encoding), [e for exs in _families(public, encoding).values() for e in exs],
                   _families(public_eval, encoding) if public_eval else {})


def user_data(path: Path, n_devices: int, seed: int, encoding: str | None = None) -> SimData:
    """A directory (one file per device) or one file split across devices; 10% of each held out,
    and another 10% held by the aggregator alone as its public set."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if len(files) != n_devices:
            raise ValueError(f"--data {path} has {len(files)} files but --devices is {n_devices}: give one file per device")
        per_file = [load_file(f, family=f.stem, encoding=encoding) for f in files]
        per_file = [[Example(e.instruction, e.input, e.output, f.stem) for e in exs] for f, exs in zip(files, per_file)]
    else:
        exs = load_file(path, family=path.stem, encoding=encoding)
        per_file = [[Example(e.instruction, e.input, e.output, path.stem) for e in exs]]
    shards: list[list[Example]] = []
    held: dict[str, list[Example]] = {}
    public: list[Example] = []
    for exs in per_file:
        k = max(1, int(len(exs) * HELDOUT_FRACTION))
        p = max(1, int(len(exs) * PUBLIC_FRACTION))
        if len(exs) - k - p < 1:
            raise ValueError(f"{exs[0].family}: {len(exs)} examples is too few to hold out {k} for evaluation "
                             f"and {p} for the aggregator's public set")
        held.setdefault(exs[0].family, []).extend(exs[-k:])
        public.extend(exs[-k - p : -k])
        shards.append(exs[: -k - p])
    if len(shards) == 1 and n_devices > 1:
        shards = partition.split_even(shards[0], n_devices, seed)
    if any(not s for s in shards):
        raise ValueError(f"not enough examples to give each of {n_devices} devices at least one")
    return SimData(shards, held, public, {})


def public_examples(n: int, seed: int, exclude: Sequence[Example] = (), slice_per_family: int = PUBLIC_SLICE) -> list[Example]:
    """The aggregator's public set: ``n`` examples of each public family, plus a small slice of
    each private family that no device holds (its questions are not in ``exclude``)."""
    out = [e for f in tasks.PUBLIC_FAMILIES for e in tasks.generate(f, n, seed + 1)]
    seen = {(e.instruction, e.input) for e in exclude}
    for f in tasks.PRIVATE_FAMILIES:
        cands = tasks.generate(f, 20 * slice_per_family, seed + 2)
        picked = [e for e in cands if f in tasks.TABLE_FAMILIES or (e.instruction, e.input) not in seen][:slice_per_family]
        out.extend(picked)
    return out


@dataclass(frozen=True)
class DataPaths:
    shards: list[Path]  # one per device: each device reads only its own (see write_data)
    eval_dir: Path  # data/eval/FAMILY.jsonl: held-out private families (the simulation's, for scoring)
    public: Path  # data/public/public.jsonl: the aggregator's public set
    public_eval_dir: Path | None  # data/public_eval/FAMILY.jsonl: held-out public families


PRIVATE_DIR = "private"  # under a simulated device's own directory: its shard, and nothing else's


def shard_under_device(out: Path, i: int) -> Path:
    """Where the simulation keeps device-i's private shard: inside that device's own directory
    (``OUT/edge/device-I/private/train.jsonl``, 0700), beside its state, never in a directory the
    aggregator's inputs share."""
    return out / "edge" / f"device-{i}" / PRIVATE_DIR / "train.jsonl"


def write_data(out: Path, data: SimData, shard_path: Callable[[Path, int], Path] | None = None) -> DataPaths:
    """The run's data: each shard at ``shard_path(out, i)`` (default ``OUT/data/device-I.jsonl``,
    trial data to hand out: ``fl-sim --data-only``), the held-out and public sets under OUT/data."""
    shard_paths = []
    for i, shard in enumerate(data.shards):
        p = shard_path(out, i) if shard_path is not None else out / "data" / f"device-{i}.jsonl"
        if shard_path is not None:
            p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            p.parent.chmod(0o700)
        write_jsonl(p, shard)
        shard_paths.append(p)
    eval_dir = out / "data" / "eval"
    for fam, exs in data.heldout.items():
        write_jsonl(eval_dir / f"{fam}.jsonl", exs)
    pub = out / "data" / "public" / "public.jsonl"
    write_jsonl(pub, data.public)
    pub_eval = None
    if data.public_heldout:
        pub_eval = out / "data" / "public_eval"
        for fam, exs in data.public_heldout.items():
            write_jsonl(pub_eval / f"{fam}.jsonl", exs)
    return DataPaths(shard_paths, eval_dir, pub, pub_eval)


def write_json(path: Path, obj: dict) -> Path:
    """Configs may hold broker passwords: created 0600."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=2))
    return path
