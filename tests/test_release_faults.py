"""Releases as durable state under faults (issue 23), over a real Mosquitto (TLS, passwords, ACLs).

Each case runs the product's own launcher (``fl_sim.run``: aggregator, three devices and broker as
separate processes, secure aggregation on; one round, whose release is due after it), kills one
process by PID at a chosen point of the release, restarts it, and checks that every device ends
with the same release, verified on its disk (signature and every file's digest), and nothing half
done is left behind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fl_sim.run import SimSettings, finish, launch
from tests.test_faults import _device, _kill9, _restart_aggregator, _wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DEVICES = ("device-0", "device-1", "device-2")


def _settings(out: Path, models: dict[str, str]) -> SimSettings:
    return SimSettings(devices=3, rounds=1, out=str(out), broker_mode="mosquitto", mode="fedit", student=models["student"],
                       local_steps=4, examples_per_family=20, eval_per_family=4, round_timeout_s=60.0, seed=3)


def _wait_path(p: Path, proc, what: str, timeout: float = 300.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not p.exists():
        assert time.monotonic() < deadline and proc.poll() is None, f"never reached {what}"
        time.sleep(0.02)


def _every_device_has_the_release(out: Path) -> str:
    from edge_client.releases import ReleaseStore
    from shared.crypto import load_public_keys

    ids = set()
    for dev in DEVICES:
        cfg = json.loads((out / "config" / f"{dev}.json").read_text())
        root = out / "edge" / dev / "releases"
        cur = ReleaseStore(root, load_public_keys(cfg["aggregator_keys"]), cfg.get("fleet", "default")).current()
        assert cur is not None, f"{dev} ends with no release"
        ids.add(cur[0].release_id)
        assert not [p.name for p in root.glob(".incoming-*")], f"{dev} kept a half-installed release"
        assert not (out / "edge" / dev / "release-staging").exists()
    assert len(ids) == 1, f"devices end with different releases: {ids}"
    assert not list((out / "releases").glob(".build-*")), "a stale release build is left"
    return ids.pop()


def _store_deliveries(out: Path, rid: str) -> dict[str, str]:
    from aggregator.store import Store

    st = Store(out / "aggregator.db", create=False)
    try:
        return st.deliveries(rid)
    finally:
        st.close()


@pytest.mark.parametrize("when", ["export", "delivery"])
def test_aggregator_killed_during_the_release_then_every_device_gets_it(when: str, tiny_models: dict[str, str],
                                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 while the ONNX export runs (a ``.build-*`` directory exists, nothing is signed), or
    while the release is being delivered (device-1 holds its install): the restarted aggregator
    builds the owed release (or finds it signed and sent) and every device ends with it."""
    run = launch(_settings(tmp_path / "run", tiny_models))
    try:
        if when == "delivery":
            _kill9(run.fleet.procs["device-1"])
            monkeypatch.setenv("FAULT_PAUSE_S", "6")
            slow = _device(run, "device-1", "slow-install", name="device-1")
            _wait_path(run.out / "edge" / "device-1" / "installing", slow, "device-1's install")
        else:
            deadline = time.monotonic() + 300
            while not list((run.out / "releases").glob(".build-*")):
                assert time.monotonic() < deadline and run.aggregator.poll() is None, "the aggregator never started an export"
                time.sleep(0.01)
        _kill9(run.aggregator)
        _restart_aggregator(run)
        finish(run)
    finally:
        run.fleet.stop_all(grace=0)
    rid = _every_device_has_the_release(run.out)
    assert rid == "r0001-fedit"
    log = (run.fleet.logs / "aggregator-restarted.log").read_text()
    if when == "export":
        assert "round 1's release was owed when the aggregator stopped: building it now" in log
        assert _store_deliveries(run.out, rid) == {d: "installed" for d in DEVICES}
    else:
        # Built and recorded before the kill: not built again, and the restart sends it to any
        # device that does not say it has it (device-1 finished its install on its own).
        assert "building it now" not in log
        assert json.loads((run.out / "releases" / "latest.json").read_text())["release_id"] == rid


def test_a_device_killed_while_installing_is_sent_the_release_again_at_once(tiny_models: dict[str, str], tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """device-1 killed with 1 file of the release copied: its new process says it has no release,
    the aggregator's delivery wait sends the release again at once (not after the full wait), and
    every device ends with the same verified release; the half-copied directory is gone."""
    run = launch(_settings(tmp_path / "run", tiny_models))
    try:
        _kill9(run.fleet.procs["device-1"])
        monkeypatch.setenv("FAULT_PAUSE_S", "120")
        slow = _device(run, "device-1", "slow-install", name="device-1")
        _wait_path(run.out / "edge" / "device-1" / "installing", slow, "device-1's install")
        assert list((run.out / "edge" / "device-1" / "releases").glob(".incoming-*"))  # the kill lands mid-install
        t_kill = time.monotonic()
        _kill9(slow)
        _device(run, "device-1")
        _wait_for(run.fleet.logs / "aggregator.log", r"device device-1 restarted before it answered release")
        finish(run)
        waited = time.monotonic() - t_kill
    finally:
        run.fleet.stop_all(grace=0)
    rid = _every_device_has_the_release(run.out)
    rec = [json.loads(x) for x in (run.out / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["release"]["installed"] == list(DEVICES) and rec["release"]["no_answer"] == []
    assert rec["release"]["resent"] == {"device-1": 1}
    assert _store_deliveries(run.out, rid) == {d: "installed" for d in DEVICES}
    assert waited < 60.0  # the round timeout is 60 s: the resend did not wait for it
