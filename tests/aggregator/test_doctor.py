"""``fl-agg doctor`` (issue 26, part): each check fails with its one line when its cause is injected,
and every check passes on a healthy aggregator (real Mosquitto with our TLS config, real keys,
registry and store)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from aggregator import doctor
from aggregator.cli import main as fl_agg
from aggregator.config import AggregatorConfig


@pytest.fixture(scope="module")
def agg(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from aggregator import checkpoint
    from aggregator.broker_config import MqttCredentials, write_broker_config
    from aggregator.store import FILE, RoundState, Store
    from fl_sim.run import make_keys
    from tests.brokers import free_port, mosquitto_binary, wait_for_port

    root = tmp_path_factory.mktemp("aggdoctor")
    port = free_port()
    files = write_broker_config(root / "broker", ["device-0"], tls=True, port=port, host="127.0.0.1", force=True)
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(files.conf_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    keys = make_keys(root / "keys", ["device-0"])
    login = MqttCredentials.load(files.aggregator_credentials)
    out = root / "out"
    out.mkdir()
    s = Store(out / FILE)
    for r in (0, 1):
        d = checkpoint.checkpoint_dir(out, r)
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"w" * 64)
        if r:
            s.mark_announced(r, {"device-0": r})
        st = RoundState(r, r, str(d))
        s.commit_round(st, {"optimizer": {"m": np.zeros(2)}}, {})
        checkpoint.write_mirror(out, st)
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"round": r, "status": "baseline" if r == 0 else "ok"}) + "\n")
    s.close()
    cfg = AggregatorConfig(broker=f"mqtts://127.0.0.1:{port}", student="unused", eval_data="unused", out_dir=str(out), mode="fedit",
                           username=login.username, password=login.password, ca_file=login.ca_file, keys=keys["aggregator"],
                           registry=keys["registry"], authority=keys["authority_pub"])
    yield cfg, root, keys
    proc.terminate()
    proc.wait(10)


def _fails(cfg: AggregatorConfig, name: str, text: str) -> None:
    got = {c.name: c for c in doctor.run(cfg, broker_timeout=5.0)}
    assert got[name].verdict == doctor.FAIL and text in got[name].detail, got[name].line()
    others = [c.line() for c in got.values() if c.verdict == doctor.FAIL and c.name != name]
    assert not others, others


def test_a_healthy_aggregator_passes_and_the_cli_exits_0(agg, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg, _, _ = agg
    got = {c.name: c for c in doctor.run(cfg)}
    assert {n: c.line() for n, c in got.items() if c.verdict != doctor.OK} == {}
    assert "round 1 committed" in got["store"].detail and "TLS verified" in got["broker"].detail
    path = tmp_path / "agg.json"
    path.write_text(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if v is not None and not isinstance(v, dict)}))
    assert fl_agg(["doctor", "--config", str(path)]) == 0
    assert "0 failed" in capsys.readouterr().out


def test_a_damaged_store_a_readable_key_and_the_authority_key_beside_the_aggregators(agg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, root, keys = agg
    out2 = tmp_path / "out"
    shutil.copytree(cfg.out_dir, out2)
    (out2 / "aggregator.db").write_bytes(b"")
    for side in ("-wal", "-shm"):
        (out2 / f"aggregator.db{side}").unlink(missing_ok=True)
    _fails(dataclasses.replace(cfg, out_dir=str(out2)), "store", "holds no aggregator state")
    loose = tmp_path / "aggregator.key"
    shutil.copy(cfg.keys, loose)
    os.chmod(loose, 0o644)
    got = {c.name: c for c in doctor.run(dataclasses.replace(cfg, keys=str(loose)))}
    assert got["keys"].verdict == doctor.FAIL and "has mode 0644" in got["keys"].detail
    # The authority's private key copied beside the aggregator's own: the one thing it must not hold.
    kdir = tmp_path / "keys"
    kdir.mkdir()
    shutil.copy(cfg.keys, kdir / "aggregator.key")
    shutil.copy(keys["authority_key"], kdir / "authority.key")
    _fails(dataclasses.replace(cfg, keys=str(kdir / "aggregator.key")), "authority", "PRIVATE key is readable")


def test_an_unreachable_broker_and_a_wrong_ca(agg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from shared.crypto import make_server_tls
    from tests.brokers import free_port

    cfg, _, _ = agg
    _fails(dataclasses.replace(cfg, broker=f"mqtts://127.0.0.1:{free_port()}"), "broker", "unreachable")
    ca = tmp_path / "other-ca.pem"
    ca.write_bytes(make_server_tls("127.0.0.1").ca_cert_pem)
    _fails(dataclasses.replace(cfg, ca_file=str(ca)), "broker", "not from this CA")
