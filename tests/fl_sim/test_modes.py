"""``fl-sim --mode fedit`` and ``--mode fedkd`` end to end, and what the aggregator may read.

The whole simulation runs as processes (embedded amqtt broker, or Mosquitto with TLS, passwords
and ACLs). Every process gets an audit hook (``sitecustomize`` on PYTHONPATH) that records each
file it opens, so the test can check what the aggregator's process read, not only what it wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from aggregator.checkpoint import checkpoint_dir
from aggregator.record import read
from fl_sim.run import SimSettings, finish, launch
from shared.datasets import load_file

pytestmark = pytest.mark.timeout(400)

AUDIT = '''
import json, os, sys
_log = os.environ.get("FLM_TEST_OPEN_LOG")
if _log:
    _f = open(os.path.join(_log, f"{os.getpid()}.jsonl"), "a", buffering=1)
    _f.write(json.dumps({"argv": sys.argv}) + "\\n")
    def _hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            try:
                _f.write(json.dumps({"open": os.fsdecode(args[0]), "mode": str(args[1])}) + "\\n")
            except Exception:
                pass
    sys.addaudithook(_hook)
'''


@pytest.fixture
def audited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT)
    logs = tmp_path / "opens"
    logs.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FLM_TEST_OPEN_LOG", str(logs))
    return logs


def _opened_by(logs: Path, config: Path) -> list[str]:
    """Files opened by the child process that read ``config`` (each process reads only its own)."""
    found = []
    for f in logs.glob("*.jsonl"):
        opened = [json.loads(x).get("open", "") for x in f.read_text().splitlines() if x.strip()]
        if any(Path(p).resolve() == config.resolve() for p in opened):
            found.append(opened)
    assert len(found) == 1, f"{len(found)} processes read {config}"
    return found[0]


@pytest.mark.parametrize("mode", ["fedit", "fedkd", "fl-minillm"])
def test_modes_over_the_embedded_broker(tmp_path: Path, tiny_models: dict[str, str], audited: Path, mode: str) -> None:
    s = SimSettings(devices=3, rounds=2, out=str(tmp_path / "run"), student=tiny_models["student"],
                    teacher=tiny_models["teacher"], mode=mode, local_steps=6, distil_steps=4, examples_per_family=30,
                    eval_per_family=4, round_timeout_s=120.0, minillm_steps=2)
    report = finish(launch(s))
    out = Path(s.out)
    rows = read(out / "metrics.jsonl")
    assert [r.status for r in rows] == ["baseline", "ok", "ok"]
    assert all(r.mode == mode for r in rows)
    assert all(r.student.public is not None and r.student.public.families for r in rows)  # public families scored
    # Issue 12: after the last round the student is released as signed ONNX and every device installs it.
    rel = rows[-1].release
    assert rel is not None and rel["published"], rel
    assert rel["installed"] == [f"device-{i}" for i in range(3)] and not rel["refused"], rel
    assert rel["parity"]["passed"] and rel["release_id"] in report.read_text()
    for i in range(3):
        cur = out / "edge" / f"device-{i}" / "releases" / "current"
        assert cur.is_symlink() and cur.resolve().name == rel["release_id"]
        assert (cur / "model.onnx").stat().st_size == rel["files"]["model.onnx"]
    assert rows[1].release is None  # not due after round 1 (release.every = 0)
    if mode == "fedkd":
        assert all(r.teacher is not None and r.teacher.public is not None for r in rows)
        for r in rows[1:]:
            assert r.distil is not None and r.distil["seconds"] > 0
            assert r.distil["teacher_from_student"]["steps"] == 4 and r.distil["student_from_teacher"]["steps"] == 4
        # Both adapters are checkpointed in PEFT's format every round.
        for rnd in (0, 1, 2):
            assert (checkpoint_dir(out, rnd) / "adapter_config.json").exists()
            assert (checkpoint_dir(out, rnd, "teacher") / "adapter_model.safetensors").exists()
        state = json.loads((out / "state.json").read_text())
        assert state["round"] == 2 and state["teacher_checkpoint"].endswith("teacher/round_0002")
        text = report.read_text()
        assert "Student and teacher per round" in text and "Distillation on the aggregator took" in text
    elif mode == "fl-minillm":
        # Round 1: the fleet teaches the teacher (its scores only summed); round 2: the teacher the student.
        assert [r.distil["role"] for r in rows[1:]] == ["client", "server"]
        assert rows[1].distil["learner"] == "teacher" and rows[2].distil["learner"] == "student"
        assert rows[1].distil["scoring_up_bytes_per_device"] > 0 and "scoring_values" not in rows[2].distil
        assert all(r.distil["steps"] == 2 for r in rows[1:])
        assert all(r.teacher is not None for r in rows)
        assert (checkpoint_dir(out, 2, "teacher") / "adapter_model.safetensors").exists()
    else:
        assert all(r.teacher is None and r.distil is None for r in rows)

    # No device's training examples reach the aggregator: it never opens a shard or a device's
    # state, and nothing it wrote or logged holds a training example.
    opened = [Path(p).resolve() for p in _opened_by(audited, out / "config" / "aggregator.json")]
    shards = sorted((out / "edge").glob("device-*/private/train.jsonl"))  # each only under its device's directory
    assert len(shards) == 3 and not list((out / "data").glob("device-*.jsonl"))
    private_files = {p.resolve() for p in shards}
    assert not private_files & set(opened)
    assert not [p for p in opened if (out / "edge").resolve() in p.parents]
    assert any((out / "data" / "public").resolve() in p.parents for p in opened)  # it did read its public set
    dev0 = [Path(p).resolve() for p in _opened_by(audited, out / "config" / "device-0.json")]
    assert shards[0].resolve() in dev0  # control: the hook does see a device read its own shard
    written = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json", ".log", ".md", ".safetensors")
               and not (out / "data") in p.parents and not (out / "edge") in p.parents
               and not (out / "config") in p.parents and p.name not in {f"device-{i}.log" for i in range(3)}]
    blob = b"".join(p.read_bytes() for p in written)
    # Quoted inputs are searched in text only: 4 bytes like b'"49"' turn up in binary weights by chance.
    text_blob = b"".join(p.read_bytes() for p in written if p.suffix != ".safetensors")
    public = {(e.instruction, e.input) for e in load_file(out / "data" / "public" / "public.jsonl")}
    leaked = []
    for shard in shards:
        for e in load_file(shard):
            if e.family == "facts" or (e.instruction, e.input) in public:
                continue  # the fact table is shared knowledge by design
            if (e.prompt + e.output).encode() in blob or json.dumps(e.input).encode() in text_blob:
                leaked.append(e)
    assert not leaked, leaked[:3]


def test_fl_minillm_over_mosquitto_with_tls(tmp_path: Path, tiny_models: dict[str, str]) -> None:
    """A client-teacher round over Mosquitto with TLS, passwords and ACLs: what the aggregator
    learned (and wrote, under fleet/) is the mean of the devices' scores (each weighs 1), which
    each device kept in clear for this check only (keep_sent)."""
    import numpy as np

    from shared import update_codec

    s = SimSettings(devices=3, rounds=1, out=str(tmp_path / "run"), broker_mode="mosquitto", student=tiny_models["student"],
                    teacher=tiny_models["teacher"], mode="fl-minillm", local_steps=4, examples_per_family=20,
                    eval_per_family=3, round_timeout_s=120.0, minillm_steps=1, keep_sent=True)
    run = launch(s)
    assert run.broker.startswith("mqtts://")
    finish(run)
    out = Path(s.out)
    rows = read(out / "metrics.jsonl")
    assert [r.status for r in rows] == ["baseline", "ok"] and rows[1].secagg and len(rows[1].received) == 3
    assert rows[1].distil["role"] == "client" and rows[1].distil["scoring_up_bytes_per_device"] > 0
    fleet = np.load(out / "fleet" / "round_0001_scores.npy")
    n = {d: len(load_file(out / "edge" / d / "private" / "train.jsonl")) for d in rows[1].received}
    w = {d: update_codec.weight(n[d], 1) for d in n}  # the aggregator's weight_norm: every device weighs 1
    mine = {d: np.load(out / "edge" / d / "sent" / "round_0001_scores.npy") for d in n}
    want = sum(w[d] * mine[d] for d in n) / sum(w.values())
    assert fleet.shape == want.shape and np.abs(fleet - want).max() < 1e-6  # 32-bit ring: the bound is ~1e-9
    assert all(np.abs(mine[d] - fleet).max() > 1e-4 for d in n)  # no device's own scores are it (100x the check above)


def test_fedit_over_mosquitto_with_tls(tmp_path: Path, tiny_models: dict[str, str]) -> None:
    s = SimSettings(devices=2, rounds=1, out=str(tmp_path / "run"), broker_mode="mosquitto", student=tiny_models["student"],
                    mode="fedit", local_steps=4, examples_per_family=20, eval_per_family=3, round_timeout_s=120.0)
    run = launch(s)
    assert run.broker.startswith("mqtts://")
    finish(run)
    rows = read(Path(s.out) / "metrics.jsonl")
    assert [r.status for r in rows] == ["baseline", "ok"] and rows[1].secagg and rows[1].teacher is None


def test_public_set_and_corpus_hold_no_private_example() -> None:
    from fl_sim import prepare

    data = prepare.generated(3, 50, 5, "dirichlet", 0.5, seed=0)
    private = {(e.instruction, e.input) for s in data.shards for e in s if e.family != "facts"}
    assert not private & {(e.instruction, e.input) for e in data.public}
    texts = {e.prompt + e.output for s in data.shards for e in s if e.family != "facts"}
    assert not texts & set(data.corpus)
    assert {e.family for e in data.public} >= {"trivia", "count", "arithmetic"}  # public families + a public slice
    held = {(e.instruction, e.input) for exs in data.heldout.values() for e in exs if e.family != "facts"}
    assert not held & (private | {(e.instruction, e.input) for e in data.public})
