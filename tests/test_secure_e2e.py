"""``fl-sim --broker-mode mosquitto``: the whole loop over TLS, passwords and ACLs, with security on.

Secure aggregation and sparse updates are on (the product's default path), so this is also the
system-level run of issue 4 over a real broker. Captures updates on the broker (as an account
allowed to read uploads would) and shows they carry no plaintext bytes of what the devices
contributed and open under nothing but the right key and associated data.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.broker_config import MqttCredentials
from fl_sim.run import SimSettings, finish, launch
from shared import messages as M
from shared import topics
from shared.crypto import AssociatedData, CryptoError, load_private_keys, load_public_keys, open_sealed

pytestmark = pytest.mark.timeout(400)


class Capture:
    """Everything published under flm/v1/up/#, as the broker delivered it."""

    def __init__(self, creds: MqttCredentials) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="capture", protocol=mqtt.MQTTv5)
        self.c.username_pw_set(creds.username, creds.password)
        self.c.tls_set(ca_certs=creds.ca_file)
        self.c.on_message = lambda c, u, m: self._add(m.topic, bytes(m.payload))
        self.c.connect(creds.host, creds.port)
        self.c.subscribe(topics.up_filter(), qos=1)
        self.c.loop_start()

    def _add(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.got.append((topic, payload))

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_sim_over_mosquitto_tls_acl_and_captured_update_tamper(tmp_path: Path, tiny_models: dict[str, str]) -> None:
    s = SimSettings(devices=3, rounds=2, out=str(tmp_path / "run"), broker_mode="mosquitto", student=tiny_models["student"],
                    local_steps=8, examples_per_family=30, eval_per_family=6, round_timeout_s=120.0, keep_received=True,
                    secagg=True, density=0.25, value_bits=14, keep_sent=True,
                    teacher=tiny_models["teacher"])  # the default mode, fedkd: FedAvg then mutual distillation
    run = launch(s)
    assert run.broker.startswith("mqtts://")
    cap = Capture(MqttCredentials.load(run.out / "broker" / "credentials" / "auditor.json"))  # read-only account
    try:
        finish(run)
    finally:
        cap.close()
    out = run.out
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["baseline", "ok", "ok"]
    assert rows[-1]["mean_loss"] < rows[0]["mean_loss"]
    conf = (out / "broker" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "certfile" in conf and "acl_file" in conf

    captured = [(t, p) for t, p in cap.got if t.endswith("/update")]
    assert len(captured) == 6, [t for t, _ in cap.got]
    everything = b"".join(p for _, p in cap.got)
    # No plaintext bytes of any device's contribution anywhere on the broker.
    for rnd in (1, 2):
        for dev in run.device_ids:
            sent = np.load(out / "edge" / dev / "sent" / f"round_{rnd:04d}.npy")
            vals = sent[np.flatnonzero(sent)]
            assert vals.size > 1000
            for probe in (vals.astype("<f4").tobytes()[:48], vals.astype("<f2").tobytes()[:32]):
                assert probe not in everything, f"plaintext of {dev}'s round {rnd} contribution found on the wire"
    # Secure aggregation ran, with the key exchange counted in the bytes of every device.
    assert all(r["secagg"] and r["sparse"]["k"] < r["sparse"]["dim"] for r in rows[1:])
    assert all(r["bytes_by_kind"][d]["up_secagg"] > 0 for r in rows[1:] for d in run.device_ids)

    # What left each device is in its ledger (issue 24): every device's ledger verifies under its
    # key, and every whole message the auditor's account saw on the broker (statuses, secure
    # aggregation stages, updates; chunk frames are parts of one) is an entry, by its SHA-256.
    import hashlib

    from shared import ledger

    for dev in run.device_ids:
        path = out / "edge" / dev / "ledger.jsonl"
        head = ledger.verify(path, load_public_keys(out / "keys" / f"{dev}.pub.json"))
        recorded = {obj["entry"]["sha256"] for _, _, obj in ledger.entries(path)}
        seen = [p for t, p in cap.got if f"/{dev}/" in t and not t.endswith("/chunk") and p]
        assert seen and all(hashlib.sha256(p).hexdigest() in recorded for p in seen), dev
        assert head.kinds.get("masked_update") == 2 and head.kinds.get("secagg", 0) > 0
    # The aggregator's audit log agrees with the ledgers (fl-sim ran `fl-audit check` at the end).
    check = json.loads((out / "audit_check.json").read_text())
    assert check["ok"] and check["problems"] == [] and check["not_checked"] == []
    assert all(check["devices"][d]["counted"] == 2 for d in run.device_ids)
    assert {r["decrypted"] for r in check["rounds"].values()} == {"aggregate only"}
    page = (out / "audit" / "report.html").read_text()  # and wrote its page (tests/shared/test_audit_report.py)
    assert "PASSED: both sides agree" in page and all(f"{d}: " in page for d in run.device_ids)
    # Each device's private shard lives only under its own directory (0700), and both reports say where.
    for d in run.device_ids:
        private = out / "edge" / d / "private"
        assert (private / "train.jsonl").is_file() and (private.stat().st_mode & 0o077) == 0
        assert f"{d}&#x27;s private data: {private}/" in page or f"{d}'s private data: {private}/" in page
    assert not list((out / "data").glob("device-*.jsonl")), "a shard outside its device's directory"
    assert "## Where the data is" in (out / "report.md").read_text()

    agg = load_private_keys(out / "keys" / "aggregator.key")
    wrong = load_private_keys(out / "keys" / "device-1.key")
    topic, data = next((t, p) for t, p in captured if "/device-0/" in t)
    outer = M.decode(data, expect=M.Sealed)
    assert isinstance(outer, M.Sealed)
    dev0 = load_public_keys(out / "keys" / "device-0.pub.json")
    assert outer.kind == "masked_update"
    aad = AssociatedData(round=outer.round, device_id="device-0", kind="masked_update")
    inner = M.decode(open_sealed(outer.blob, recipient=agg, sender=dev0, aad=aad), expect=M.MaskedUpdate)
    assert inner.device_id == "device-0"  # type: ignore[attr-defined]

    def refused(blob: bytes, recipient=agg, aad=aad) -> None:
        with pytest.raises(CryptoError):
            open_sealed(blob, recipient=recipient, sender=dev0, aad=aad)

    refused(outer.blob, recipient=wrong)  # wrong key
    for pos in (5, len(outer.blob) // 2, len(outer.blob) - 20, len(outer.blob) - 1):  # flipped bits
        flipped = bytearray(outer.blob)
        flipped[pos] ^= 0x80
        refused(bytes(flipped))
    refused(outer.blob[:-1])  # truncated body
    refused(outer.blob[: len(outer.blob) // 2])
    refused(outer.blob, aad=AssociatedData(round=outer.round + 1, device_id="device-0", kind="masked_update"))  # another round
    refused(outer.blob, aad=AssociatedData(round=outer.round, device_id="device-1", kind="masked_update"))  # another device
    refused(outer.blob, aad=AssociatedData(round=outer.round, device_id="device-0", kind="update"))  # another kind
