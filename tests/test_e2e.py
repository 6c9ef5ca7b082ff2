"""Whole rounds over a real Mosquitto: aggregator and devices as separate processes.

These drive the product's own launcher (``fl_sim.run``) with models built from configs and loaded
back through ``from_pretrained``, then check what the aggregator received, stored and measured.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.checkpoint import checkpoint_dir, load_adapter
from fl_sim.run import SimSettings, finish, launch
from shared import messages as M
from shared import secure, tensors, topics
from shared.crypto import load_public_keys
from tests.brokers import Mosquitto

pytestmark = pytest.mark.timeout(300)


def _settings(tmp_path: Path, broker: Mosquitto, models: dict[str, str], **kw: object) -> SimSettings:
    base: dict = dict(devices=3, rounds=2, out=str(tmp_path / "run"), broker=broker.url, student=models["student"],
                      local_steps=8, examples_per_family=30, eval_per_family=6, round_timeout_s=120.0, keep_received=True,
                      secagg=False, mode="fedit")  # the FedIT baseline: the test inspects each received update
    base.update(kw)
    return SimSettings(**base)


class Watcher:
    """An MQTT observer (and, on an ACL-free broker, an attacker) beside the fleet.

    It verifies device status messages with the devices' enrolled keys, as the aggregator does.
    """

    def __init__(self, url: str, keydir: Path) -> None:
        self.keys = {p.name.removesuffix(".pub.json"): load_public_keys(p) for p in keydir.glob("device-*.pub.json")}
        self.states: dict[str, str] = {}
        self.cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watcher", protocol=mqtt.MQTTv5)
        self.c.on_message = self._on_message
        host, port = url.removeprefix("mqtt://").split(":")
        self.c.connect(host, int(port))
        self.c.subscribe(topics.up_filter() .replace("#", "status"), qos=1)
        self.c.loop_start()

    def _on_message(self, client: object, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        dev = topics.parse(msg.topic).device_id
        st = secure.open_message(msg.payload, M.DeviceStatus, device_id=dev, check_round=lambda r: None,
                                 recipient=None, sender=self.keys[dev], sealed=False)
        assert isinstance(st, M.DeviceStatus)
        with self.cond:
            self.states[st.device_id] = f"{st.state}:{st.detail}"
            self.cond.notify_all()

    def wait_state(self, device: str, prefix: str, timeout: float = 120.0) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: self.states.get(device, "").startswith(prefix), timeout)
        assert ok, f"{device} never reached {prefix!r}; last {self.states.get(device)}"

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_three_devices_two_rounds_fedavg_and_bad_messages(tmp_path: Path, mosquitto: Mosquitto, tiny_models: dict[str, str]) -> None:
    run = launch(_settings(tmp_path, mosquitto, tiny_models))
    w = Watcher(mosquitto.url, run.out / "keys")
    try:
        # While round 1 is under way, inject a wrong version, a bad schema and a truncated payload
        # on a device's upload topic (this broker has no ACLs, so anyone may).
        w.wait_state("device-0", "training:round 1")
        good = M.encode(M.Update(round=1, device_id="device-0", seq=99, num_examples=1, steps=1, train_loss=0.0,
                                 payload="delta", base_digest="0" * 64, tensors=()))
        env = msgpack.unpackb(good, raw=False)
        w.publish(topics.up("device-0", "update"), msgpack.packb({**env, "v": 7}, use_bin_type=True))
        w.publish(topics.up("device-0", "update"), msgpack.packb({**env, "b": {**env["b"], "seq": "x"}}, use_bin_type=True))
        w.publish(topics.up("device-0", "update"), good[: len(good) // 2])
        report = finish(run)
    finally:
        w.close()
    out = run.out
    rows = _metrics(out)
    assert [r["status"] for r in rows] == ["baseline", "ok", "ok"]
    assert all(r["received"] == ["device-0", "device-1", "device-2"] for r in rows[1:])

    agg_log = (out / "logs" / "aggregator.log").read_text()
    for err in ("VersionError", "SchemaError", "TruncatedError"):
        assert f"rejected message on flm/v1/up/device-0/update: {err}" in agg_log
    assert rows[1]["rejected_messages"] >= 3

    # The aggregate equals the example-weighted mean of the updates the aggregator received.
    for rnd in (1, 2):
        before = load_adapter(checkpoint_dir(out, rnd - 1))
        after = load_adapter(checkpoint_dir(out, rnd))
        ups = [M.decode(p.read_bytes(), expect=M.Update) for p in sorted((out / "received" / f"round_{rnd:04d}").iterdir())]
        assert len(ups) == 3
        total = sum(u.num_examples for u in ups)  # type: ignore[attr-defined]
        deltas = [(u.num_examples, tensors.unpack(u.tensors)) for u in ups]  # type: ignore[attr-defined]
        assert set(after) == set(before) == set(deltas[0][1])
        moved = 0.0
        for k in before:
            want = before[k].astype(np.float64) + sum(n / total * d[k].astype(np.float64) for n, d in deltas)
            np.testing.assert_allclose(after[k], want, rtol=1e-5, atol=1e-6)
            moved += float(np.abs(after[k] - before[k]).sum())
        assert moved > 0, "the global adapter did not change"
        assert (checkpoint_dir(out, rnd) / "adapter_config.json").exists()  # PEFT's standard format

    # The held-out loss fell, per family on average and overall.
    assert rows[-1]["mean_loss"] < rows[0]["mean_loss"]
    # Bytes on the wire were measured per device in both directions.
    for r in rows[1:]:
        for d in r["participants"]:
            assert r["bytes_up"][d] > r["bytes_down"][d] * 0.5 > 0
    text = report.read_text()
    assert "Bytes on the wire per device" in text and "lower" in text
    assert (out / "metrics.png").stat().st_size > 10_000


def test_dropout_mid_round_then_below_quorum_abandons(tmp_path: Path, mosquitto: Mosquitto, tiny_models: dict[str, str]) -> None:
    # Enough local steps that a device is still training when we kill it.
    run = launch(_settings(tmp_path, mosquitto, tiny_models, local_steps=400, quorum=2, keep_received=False))
    w = Watcher(mosquitto.url, run.out / "keys")
    try:
        w.wait_state("device-2", "training:round 1")
        run.fleet.procs["device-2"].kill()  # SIGKILL: no goodbye, only the broker's last will
        w.wait_state("device-1", "training:round 2", timeout=200)
        run.fleet.procs["device-1"].kill()
        report = finish(run)
    finally:
        w.close()
    out = run.out
    rows = _metrics(out)
    assert [r["status"] for r in rows] == ["baseline", "ok", "abandoned"]
    assert rows[1]["received"] == ["device-0", "device-1"] and rows[1]["dropped"] == ["device-2"]
    assert rows[2]["received"] == ["device-0"]
    agg_log = (out / "logs" / "aggregator.log").read_text()
    assert "device device-2 went offline" in agg_log
    assert "round 2 abandoned: 1 of 2 updates received, quorum is 2; global model unchanged" in agg_log
    # The global model is unchanged by the abandoned round: same checkpoint, same evaluation.
    assert json.loads((out / "state.json").read_text())["round"] == 1
    assert not checkpoint_dir(out, 2).exists()
    assert rows[2]["mean_loss"] == rows[1]["mean_loss"]
    assert rows[2]["eval"] == rows[1]["eval"]
    assert "abandoned" in report.read_text()
