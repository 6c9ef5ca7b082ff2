"""Fault injection over a real Mosquitto (TLS, passwords, ACLs): processes killed by PID and restarted.

Each case runs the product's own launcher (``fl_sim.run``: the aggregator, three devices and the
broker as separate processes, security and secure aggregation on), injects one fault and checks
the rounds' outcome and the final global model against a fault-free run with the same seeds.

The model comparison: every device trains deterministically (one thread, seeded by the model
version, ``aggregator.plan``); only secure aggregation's stochastic rounding differs between
runs, so the final models agree to a tiny fraction of what training changed (``_close``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.checkpoint import load_adapter
from fl_sim.run import Launched, SimSettings, finish, launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROUND_TIMEOUT = 90.0


def _settings(out: Path, models: dict[str, str], rounds: int, keep_sent: bool = False, secagg: bool = True) -> SimSettings:
    return SimSettings(devices=3, rounds=rounds, out=str(out), broker_mode="mosquitto", mode="fedit",
                       student=models["student"], local_steps=6, examples_per_family=30, eval_per_family=4,
                       round_timeout_s=ROUND_TIMEOUT, seed=3, keep_sent=keep_sent, secagg=secagg)


def _rounds(out: Path) -> list[dict]:
    return [r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) if r["round"] > 0]


def _final(out: Path) -> dict[str, np.ndarray]:
    return load_adapter(json.loads((out / "state.json").read_text())["checkpoint"])


def _wait_for(path: Path, pattern: str, timeout: float = 240.0) -> None:
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and rx.search(path.read_text(errors="replace")):
            return
        time.sleep(0.05)
    raise AssertionError(f"{path.name}: no line matching {pattern!r} within {timeout:.0f}s")


def _kill9(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)


def _restart_aggregator(run: Launched) -> None:
    run.aggregator = run.fleet.start("aggregator-restarted", ["-m", "aggregator.cli", "run", "--config",
                                                              str(run.out / "config" / "aggregator.json")])


def _device(run: Launched, dev: str, fault: str | None = None, name: str | None = None) -> subprocess.Popen:
    cfg = str(run.out / "config" / f"{dev}.json")
    args = (["-m", "edge_client.cli", "run", "--config", cfg] if fault is None else
            ["-c", "from tests.fault_inject import main; main()", fault, "run", "--config", cfg])
    return run.fleet.start(name or f"{dev}-{fault or 'restarted'}", args)


def _flat(m: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([m[k].astype(np.float64).ravel() for k in sorted(m)])


def _swap_and_finish(run: Launched, victim: subprocess.Popen, standby: subprocess.Popen, dev: str = "device-1") -> None:
    """kill -9 ``victim``, let the loaded ``standby`` connect in its place, run to the end."""
    _wait_for(run.fleet.logs / f"{dev}-restarted.log", r"student .* loaded")
    _kill9(victim)
    (run.out / "edge" / dev / "go").touch()
    finish(run)
    assert standby.wait(30) == 0


def _close(out: Path, reference: dict) -> None:
    """The final model is the fault-free one, to within 0.1 % of how far training moved it.

    Not bit for bit: secure aggregation rounds each coordinate stochastically (steps of about
    1e-10 here), and the next round's local Adam steps carry that noise on, so the two runs
    differ by about 1e-6 on updates of about 1e-2.
    """
    a, b = _final(out), reference["final"]
    assert sorted(a) == sorted(b)
    init = _flat(load_adapter(out / "checkpoints" / "round_0000"))
    moved = np.linalg.norm(_flat(b) - init)
    diff = np.linalg.norm(_flat(a) - _flat(b))
    assert moved > 0 and diff <= 1e-3 * moved, f"final model differs from the fault-free run by {diff:.3g} (training moved it {moved:.3g})"
    other = np.linalg.norm(_flat(load_adapter(reference["out"] / "checkpoints" / "round_0001")) - _flat(b))
    assert diff < 0.01 * other  # far closer than the fault-free model was one round earlier: the check can fail


@pytest.fixture(scope="module")
def reference(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """Fault-free runs of 2 rounds: the model every faulty run must end at."""
    out = tmp_path_factory.mktemp("reference") / "run"
    finish(launch(_settings(out, tiny_models, rounds=2)))
    rounds = _rounds(out)
    assert [r["status"] for r in rounds] == ["ok", "ok"] and all(len(r["received"]) == 3 for r in rounds)
    return {"final": _final(out), "out": out}


@pytest.mark.parametrize("when", ["collection", "unmasking"])
def test_aggregator_killed_mid_round_and_restarted(when: str, tiny_models: dict[str, str], tmp_path: Path,
                                                   reference: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 during round 2's collection (after the first masked update arrived) or its unmasking
    (after a device sent its unmask shares), then ``fl-agg run`` with the same config: round 2 is
    aborted, round 3 completes with every device, and the model is the 2-round fault-free one."""
    run = launch(_settings(tmp_path / "run", tiny_models, rounds=3))
    try:
        # device-2 holds round 2 in its unmasking step (the aggregator waits for every survivor's
        # shares), so the kill lands before round 2 can complete however fast this machine is.
        _kill9(run.fleet.procs["device-2"])
        monkeypatch.setenv("FAULT_ROUND", "2")
        monkeypatch.setenv("FAULT_PAUSE_S", "8")
        slow = _device(run, "device-2", "slow-unmask", name="device-2")
        if when == "collection":
            _wait_for(run.fleet.logs / "aggregator.log", r"round 2: masked_update from device-\d \(1/3\)")
        else:
            _wait_for(run.fleet.logs / "device-0.log", r"round 2 unmask shares sent")
            marker = run.out / "edge" / "device-2" / "unmasking"
            deadline = time.monotonic() + 120
            while not marker.exists():
                assert time.monotonic() < deadline and slow.poll() is None, "device-2 never reached round 2's unmasking"
                time.sleep(0.02)
        _kill9(run.aggregator)
        assert [r["round"] for r in _rounds(run.out)] == [1]
        _restart_aggregator(run)
        finish(run)
    finally:
        run.fleet.stop_all(grace=0)
    rounds = _rounds(run.out)
    # Round 2, cut short by the kill, has its own record now (issue 23): only the store's phases showed it.
    assert [(r["round"], r["status"]) for r in rounds] == [(1, "ok"), (2, "interrupted"), (3, "ok")]
    assert rounds[-1]["received"] == ["device-0", "device-1", "device-2"]
    log = (run.fleet.logs / "aggregator-restarted.log").read_text()
    assert "round 2 was announced but did not complete" in log
    _close(run.out, reference)


def _wait_uploading(run: Launched, dev: str, proc: subprocess.Popen, name: str) -> None:
    marker = run.out / "edge" / dev / "uploading"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert time.monotonic() < deadline, f"{dev} never started its upload"
        assert proc.poll() is None, (run.fleet.logs / f"{name}.log").read_text()[-2000:]
        time.sleep(0.02)


def test_broker_stopped_for_5s_during_uploads(tiny_models: dict[str, str], tmp_path: Path, reference: dict,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Mosquitto stopped while round 1's updates are coming in (device-0 half way through its
    upload), started again 5 s later on the same port with the same config: every device
    reconnects, the round completes with all three, and the model is the fault-free one."""
    run = launch(_settings(tmp_path / "run", tiny_models, rounds=2))
    try:
        _kill9(run.fleet.procs["device-0"])
        monkeypatch.setenv("FAULT_PAUSE_S", "3")  # its last chunks go out while the broker is down
        slow = _device(run, "device-0", "slow-upload", name="device-0")
        _wait_uploading(run, "device-0", slow, "device-0")
        broker = run.fleet.procs["broker"]
        broker.terminate()
        broker.wait(10)
        time.sleep(5)
        run.fleet.start("broker-restarted", list(broker.args[:]), python=False)  # type: ignore[index]
        finish(run)
    finally:
        run.fleet.stop_all(grace=0)
    rounds = _rounds(run.out)
    assert [(r["round"], r["status"], r["received"]) for r in rounds] == [(1, "ok", ["device-0", "device-1", "device-2"]),
                                                                         (2, "ok", ["device-0", "device-1", "device-2"])]
    for d in run.device_ids:  # nobody died of the outage
        assert run.fleet.procs[d].wait(30) == 0, (run.fleet.logs / f"{d}.log").read_text()[-2000:]
    _close(run.out, reference)


def test_a_device_that_sends_nan_every_round_does_not_stop_the_others(tiny_models: dict[str, str], tmp_path: Path) -> None:
    """device-2's update has a NaN every round: it declines on the device (before masking), every
    round completes with the other two, and the record says why device-2 is missing."""
    run = launch(_settings(tmp_path / "run", tiny_models, rounds=2))
    try:
        _kill9(run.fleet.procs["device-2"])  # replaced before it loaded its model by one with the fault
        _device(run, "device-2", "nan")
        finish(run)
    finally:
        run.fleet.stop_all(grace=0)
    rounds = _rounds(run.out)
    assert [(r["round"], r["status"], r["received"]) for r in rounds] == [(1, "ok", ["device-0", "device-1"]),
                                                                         (2, "ok", ["device-0", "device-1"])]
    for r in rounds:
        assert "non-finite update" in r["drop_reasons"]["device-2"]
        # The round moved on when device-2 declined, not at the deadline.
        assert r["time_s"] < ROUND_TIMEOUT / 2, r
    final = _final(run.out)
    assert all(np.isfinite(v).all() for v in final.values())


def test_a_device_killed_mid_upload_is_a_dropout_then_accepted_next_round(tiny_models: dict[str, str], tmp_path: Path) -> None:
    """device-1 is killed by PID half way through its round-1 upload (manifest and first chunk
    sent) and restarted at once with its config: round 1 completes with the other two (device-1
    a dropout), round 2 accepts device-1's update, and none of its updates is accepted twice.

    The restarted process has loaded its model before the kill (``standby``): rounds of this
    tiny model take about a second, less than a cold start, and round 2 must find it online."""
    run = launch(_settings(tmp_path / "run", tiny_models, rounds=2))
    try:
        _kill9(run.fleet.procs["device-1"])
        slow = _device(run, "device-1", "slow-upload")
        standby = _device(run, "device-1", "standby", name="device-1-restarted")
        _wait_uploading(run, "device-1", slow, "device-1-slow-upload")
        _swap_and_finish(run, slow, standby)
    finally:
        run.fleet.stop_all(grace=0)
    rounds = _rounds(run.out)
    assert [(r["round"], r["status"]) for r in rounds] == [(1, "ok"), (2, "ok")]
    # Either the killed upload is a dropout of round 1, or (when the restarted process's outbox
    # finishes it before the round closes) it counts once; never twice.
    first_in = "device-1" in rounds[0]["received"]
    if not first_in:
        assert rounds[0]["received"] == ["device-0", "device-2"] and "device-1" in rounds[0]["drop_reasons"], rounds[0]
    assert rounds[-1]["received"] == ["device-0", "device-1", "device-2"], rounds[-1]
    agg_log = (run.fleet.logs / "aggregator.log").read_text()
    accepted = re.findall(r"round (\d): masked_update from device-1", agg_log)
    assert accepted and len(accepted) == len(set(accepted)) and (("1" in accepted) == first_in), accepted


def _check_round_is_the_mean_of_its_accepted_updates(run: Launched, rnd: int) -> None:
    """The global change of round ``rnd`` equals the FedAvg mean of what the accepted devices sent
    (their ``keep_sent`` copies), within secure aggregation's quantization bound (plain rounds:
    weighted by examples, within float32 rounding)."""
    from aggregator.checkpoint import checkpoint_dir
    from shared import messages as M
    from shared import sparse, update_codec
    from shared.datasets import load_file
    from shared.secagg.quant import error_bound

    rec = next(r for r in _rounds(run.out) if r["round"] == rnd)
    prev = max(r["round"] for r in _rounds(run.out) if r["round"] < rnd and r["status"] == "ok") if rnd > 1 else 0
    before, after = load_adapter(checkpoint_dir(run.out, prev)), load_adapter(checkpoint_dir(run.out, rnd))
    layout = sparse.Layout.from_tensors(before)
    agg = json.loads((run.out / "config" / "aggregator.json").read_text())
    n = {d: len(load_file(json.loads((run.out / "config" / f"{d}.json").read_text())["data"])) for d in rec["received"]}
    # Secure rounds weigh every device 1; plain rounds by examples, capped (AggregatorConfig.max_weight_examples).
    cap = agg.get("max_weight_examples", 1000)
    w = {d: 1 for d in n} if rec["secagg"] else {d: min(c, cap) for d, c in n.items()}
    sent = {d: np.load(run.out / "edge" / d / "sent" / f"round_{rnd:04d}.npy") for d in rec["received"]}
    expected = sum(w[d] * sent[d].astype(np.float64) for d in w) / sum(w.values())
    got = sparse.flatten(after, layout).astype(np.float64) - sparse.flatten(before, layout)
    bound = 0.0
    if rec["secagg"]:
        ring, vbits = update_codec.ring_for(len(rec["participants"]), agg.get("value_bits", 0))
        spec = M.SecAggSpec(node_ids=tuple(range(len(rec["participants"]))), threshold=2, graph_seed=bytes(32),
                            clip=agg["clip"], ring_bits=ring, value_bits=vbits, weight_norm=1, sketch_block=0)
        bound = error_bound(update_codec.quant_config(spec), len(w)) / sum(w.values())
    bound += 2 * np.finfo(np.float32).eps * float(np.abs(sparse.flatten(after, layout)).max() + np.abs(expected).max())
    assert np.abs(got - expected).max() <= bound, (rnd, float(np.abs(got - expected).max()), bound)
    assert np.count_nonzero(expected) > 0.5 * expected.size  # real training deltas, not zeros


@pytest.mark.parametrize("when", ["training", "between-rounds"])
def test_fl_edge_run_killed_and_restarted_is_accepted_again_without_duplicates(when: str, tiny_models: dict[str, str],
                                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13, lifecycle: device-1 (``fl-edge run``) is killed by PID while it trains round 2, or
    between rounds 1 and 2, and restarted with its config. It keeps its sequence counter, so its
    next update is accepted (not a replay) in round 3 at the latest; none of its updates is
    accepted twice; and each round's result is the mean of the updates that round accepted."""
    run = launch(_settings(tmp_path / "run", tiny_models, rounds=3, keep_sent=True))
    try:
        # The restart's start-up (imports, model load) is paid now: rounds of this tiny model are
        # shorter than a cold start, and the restarted device must be back for round 3.
        standby = _device(run, "device-1", "standby", name="device-1-restarted")
        if when == "training":
            _kill9(run.fleet.procs["device-1"])
            monkeypatch.setenv("FAULT_PAUSE_S", "60")
            monkeypatch.setenv("FAULT_ROUND", "2")
            victim = _device(run, "device-1", "slow-train")
            marker = run.out / "edge" / "device-1" / "training"
            deadline = time.monotonic() + 240
            while not marker.exists():
                assert time.monotonic() < deadline and victim.poll() is None, "device-1 never started training round 2"
                time.sleep(0.02)
        else:
            victim = run.fleet.procs["device-1"]
            _wait_for(run.fleet.logs / "device-1-restarted.log", r"student .* loaded")
            _wait_for(run.fleet.logs / "device-1.log", r"round 1 unmask shares sent")
        _swap_and_finish(run, victim, standby)
    finally:
        run.fleet.stop_all(grace=0)
    rounds = _rounds(run.out)
    assert [(r["round"], r["status"]) for r in rounds] == [(1, "ok"), (2, "ok"), (3, "ok")]
    assert "device-1" in rounds[0]["received"]
    if when == "training":
        assert rounds[1]["received"] == ["device-0", "device-2"] and "device-1" in rounds[1]["drop_reasons"]
    assert rounds[2]["received"] == ["device-0", "device-1", "device-2"], rounds[2]
    agg_log = (run.fleet.logs / "aggregator.log").read_text()
    accepted = re.findall(r"round (\d): masked_update from device-1", agg_log)
    assert len(accepted) == len(set(accepted)), accepted  # never twice in a round
    assert "replay" not in " ".join(r["drop_reasons"].get("device-1", "") for r in rounds).lower()
    for r in rounds:
        _check_round_is_the_mean_of_its_accepted_updates(run, r["round"])


def test_fl_edge_run_killed_after_a_training_checkpoint_resumes_its_round(tiny_models: dict[str, str], tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13, lifecycle: device-1 (``fl-edge run``, checkpointing after every local step) is
    killed by PID in round 2 right after its first training checkpoint is on disk, and restarted
    with its config well within the round's deadline. It resumes round 2 from the checkpoint: the
    round waits for it and accepts its update, no update of it arrives twice or is rejected, and
    each round's result is the mean of the updates that round accepted.

    Secure aggregation is off: a secure round's mask secrets live only in the process that
    joined it, so no checkpoint can finish one (a device killed in one rejoins the next round:
    the test above)."""
    run = launch(_settings(tmp_path / "run", tiny_models, rounds=3, keep_sent=True, secagg=False))
    try:
        cfg = run.out / "config" / "device-1.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "checkpoint_every_s": 0}))
        standby = _device(run, "device-1", "standby", name="device-1-restarted")
        _kill9(run.fleet.procs["device-1"])  # replaced by one that stops after its first checkpoint of round 2
        monkeypatch.setenv("FAULT_PAUSE_S", "60")
        monkeypatch.setenv("FAULT_ROUND", "2")
        victim = _device(run, "device-1", "slow-checkpoint")
        marker = run.out / "edge" / "device-1" / "checkpointed"
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert time.monotonic() < deadline and victim.poll() is None, "device-1 never checkpointed round 2"
            time.sleep(0.02)
        assert marker.read_text() == "2 1"  # round 2, after its first step
        _swap_and_finish(run, victim, standby)
    finally:
        run.fleet.stop_all(grace=0)
    rounds = _rounds(run.out)
    assert [(r["round"], r["status"], r["received"]) for r in rounds] == [
        (i, "ok", ["device-0", "device-1", "device-2"]) for i in (1, 2, 3)], [r["drop_reasons"] for r in rounds]
    assert all(not r["secagg"] and r["rejected_messages"] == 0 for r in rounds), rounds
    agg_log = (run.fleet.logs / "aggregator.log").read_text()
    assert "round 2: device device-1 restarted and resumes the round (resuming round 2 at step 1)" in agg_log
    assert re.findall(r"round (\d): update from device-1", agg_log) == ["1", "2", "3"]  # once each, round 2 included
    restarted = (run.fleet.logs / "device-1-restarted.log").read_text()
    assert "resuming round 2 from its training checkpoint at step 1" in restarted
    assert re.search(r"round 2 trained 6 steps in [\d.]+s \(resumed at step 1\)", restarted), restarted[-3000:]
    assert not (run.out / "edge" / "device-1" / "train_checkpoint.safetensors").exists()
    for r in rounds:
        _check_round_is_the_mean_of_its_accepted_updates(run, r["round"])


def test_fl_agg_backup_of_a_running_aggregator_restores_to_its_state(tiny_models: dict[str, str], tmp_path: Path) -> None:
    """Issue 23, acceptance 2: ``fl-agg backup`` (its CLI, another process) while the aggregator
    runs round 2; then, the run over, the backup restored into an empty directory holds round 1's
    committed state: the same adapter, bit for bit, and round 2 as announced (never re-announced)."""
    import sys

    from aggregator import backup, checkpoint

    run = launch(_settings(tmp_path / "run", tiny_models, rounds=2))
    bk = tmp_path / "bk"
    try:
        _wait_for(run.fleet.logs / "aggregator.log", r"round 2: masked_update from device-\d \(1/3\)")
        r = subprocess.run([sys.executable, "-m", "aggregator.cli", "backup", "--config", str(run.out / "config" / "aggregator.json"),
                            "--out", str(bk)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert run.aggregator.poll() is None  # it was running throughout
        finish(run)
    finally:
        run.fleet.stop_all(grace=0)
    assert [r["status"] for r in _rounds(run.out)] == ["ok", "ok"]  # the backup did not disturb the run
    restored = tmp_path / "restored"
    restored.mkdir()
    info = backup.restore(bk, restored)
    s = checkpoint.open_store(restored)
    st = s.state()
    assert st is not None and st.round == info["round"] == 1 and s.announced() == 2
    a, b = load_adapter(st.checkpoint), load_adapter(checkpoint.checkpoint_dir(run.out, 1))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert checkpoint.next_round(st.round, s.announced()) == 3


@pytest.mark.parametrize("where", ["after-check", "residual"])
def test_a_nan_after_the_devices_check_or_in_its_residual_costs_no_round_its_deadline(where: str, tiny_models: dict[str, str],
                                                                                      tmp_path: Path) -> None:
    """Issue 23: a NaN that appears after the device's own check (as its secure input is built),
    or one NaN written into its ``residual.npy``: before, the device aborted its secure round with
    a log line and nothing else, and every round waited out its full update deadline. Now the
    first declines (signed, with the reason) and the round moves on at once; the second is
    dropped at start with a warning and the device takes part as usual."""
    run = launch(_settings(tmp_path / "run", tiny_models, rounds=2))
    try:
        _kill9(run.fleet.procs["device-2"])
        if where == "after-check":
            _device(run, "device-2", "nan-secure")
        else:
            work = run.out / "edge" / "device-2"
            work.mkdir(parents=True, exist_ok=True)
            bad = np.zeros(64, np.float32)
            bad[5] = np.nan
            np.save(work / "residual.npy", bad, allow_pickle=False)
            _device(run, "device-2")
        finish(run)
    finally:
        run.fleet.stop_all(grace=0)
    rounds = _rounds(run.out)
    assert [r["status"] for r in rounds] == ["ok", "ok"]
    for r in rounds:
        assert r["time_s"] < ROUND_TIMEOUT / 2, r  # moved on when the device said so, not at the deadline
        if where == "after-check":
            assert r["received"] == ["device-0", "device-1"] and "non-finite" in r["drop_reasons"]["device-2"], r
        else:
            assert r["received"] == ["device-0", "device-1", "device-2"], r
    if where == "residual":
        assert "non-finite values: dropped" in (run.fleet.logs / "device-2-restarted.log").read_text()


def test_a_damaged_store_refuses_to_start_and_nothing_is_re_announced(tiny_models: dict[str, str], tmp_path: Path) -> None:
    """Issue 23: after a run, ``aggregator.db`` truncated to 0 bytes with its WAL gone. Before, the
    restarted aggregator re-recorded round 0 and re-announced rounds the devices had seen. Now
    ``fl-agg run`` ends with one line naming the file, exit 2, and writes nothing."""
    import sys

    run = launch(_settings(tmp_path / "run", tiny_models, rounds=1))
    try:
        finish(run)
    finally:
        run.fleet.stop_all(grace=0)
    db = run.out / "aggregator.db"
    metrics = (run.out / "metrics.jsonl").read_bytes()
    db.write_bytes(b"")
    for side in ("-wal", "-shm"):
        (run.out / f"aggregator.db{side}").unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-m", "aggregator.cli", "run", "--config", str(run.out / "config" / "aggregator.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [x for x in r.stderr.splitlines() if "aggregator.db" in x]
    assert len(errors) == 1 and "holds no aggregator state" in errors[0] and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert (run.out / "metrics.jsonl").read_bytes() == metrics and db.read_bytes() == b""


FAKETIME = [Path(f"/usr/lib/{arch}-linux-gnu/faketime/libfaketime.so.1") for arch in ("x86_64", "aarch64")]


def test_a_device_whose_clock_is_10_minutes_behind_joins(tiny_models: dict[str, str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 23: a device whose clock is 10 minutes behind (libfaketime: its Python and its
    OpenSSL both see the earlier time) failed TLS with "certificate is not yet valid" and exited
    when the broker certificate was backdated 5 minutes. It now joins every round."""
    lib = next((p for p in FAKETIME if p.exists()), None)
    if lib is None:
        pytest.skip("needs libfaketime (Debian's faketime package; .ci/run installs it)")
    run = launch(_settings(tmp_path / "run", tiny_models, rounds=2))
    try:
        _kill9(run.fleet.procs["device-2"])
        with monkeypatch.context() as m:
            m.setenv("LD_PRELOAD", str(lib))
            m.setenv("FAKETIME", "-10m")
            # The monotonic clock is shifted too (libfaketime's default): asking it not to be made
            # Python's time.sleep fail with EINVAL under libfaketime 0.9.10.
            _device(run, "device-2", name="device-2-behind")
        finish(run)
    finally:
        run.fleet.stop_all(grace=0)
    rounds = _rounds(run.out)
    assert [(r["status"], r["received"]) for r in rounds] == [("ok", ["device-0", "device-1", "device-2"])] * 2
    # Its own log is stamped by its own clock: 10 minutes before the aggregator's.
    stamp = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", re.M)

    def first(name: str) -> float:
        m = stamp.search((run.fleet.logs / name).read_text())
        assert m, name
        return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))

    assert first("aggregator.log") - first("device-2-behind.log") > 500


@pytest.mark.parametrize("fault, says", [("disk-full", "No space left on device"), ("read-only-store", "readonly")])
def test_a_full_disk_or_a_read_only_store_ends_in_one_line_with_the_store_intact(fault: str, says: str, tiny_models: dict[str, str],
                                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 23: a full disk (ENOSPC writing round 2's adapters) or a read-only store (SQLite
    refuses round 2's commit) used to end the aggregator with a traceback, and devices refused
    its shutdown broadcast. Now: one error line naming the cause, exit 2, the store intact at
    round 1 (it opens and passes its checks), and every device accepts the shutdown."""
    from aggregator import checkpoint
    from fl_sim.run import Fleet

    real_start = Fleet.start

    def start(self: Fleet, name: str, args: list[str], python: bool = True) -> subprocess.Popen:
        if name == "aggregator":  # the launcher's own command line, with the fault built in
            args = ["-c", "from tests.fault_inject import agg_main; agg_main()", fault, *args[2:]]
        return real_start(self, name, args, python)

    monkeypatch.setattr(Fleet, "start", start)
    monkeypatch.setenv("FAULT_ROUND", "2")
    run = launch(_settings(tmp_path / "run", tiny_models, rounds=3))
    try:
        rc = run.aggregator.wait(300)
        for dev in ("device-0", "device-1", "device-2"):
            _wait_for(run.fleet.logs / f"{dev}.log", r"aggregator shut down", timeout=60)
    finally:
        run.fleet.stop_all(grace=0)
    log = (run.fleet.logs / "aggregator.log").read_text()
    errors = [x for x in log.splitlines() if " ERROR " in x]
    assert rc == 2 and len(errors) == 1 and says in errors[0] and "Traceback" not in log, errors or log[-3000:]
    assert [(r["round"], r["status"]) for r in _rounds(run.out)] == [(1, "ok")]
    store = checkpoint.open_store(run.out)  # passes the integrity checks: quick_check, schema, files agree
    st = store.state()
    assert st is not None and st.round == 1 and store.announced() == 2
