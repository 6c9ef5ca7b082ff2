"""``fl-edge doctor`` (issue 26, part): each check fails with its one line when its cause is injected,
and every check passes on a healthy device (real Mosquitto with our TLS config, real keys)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edge_client import doctor
from edge_client.config import EdgeConfig
from edge_client.cli import main as fl_edge

PROFILES = Path(__file__).resolve().parents[2] / "firmware_profiles"


@pytest.fixture(scope="module")
def device(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from aggregator.broker_config import MqttCredentials, write_broker_config
    from fl_sim.run import make_keys
    from tests.brokers import free_port, mosquitto_binary, wait_for_port

    root = tmp_path_factory.mktemp("doctor")
    port = free_port()
    files = write_broker_config(root / "broker", ["device-0"], tls=True, port=port, host="127.0.0.1", force=True)
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(files.conf_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    keys = make_keys(root / "keys", ["device-0"])
    login = MqttCredentials.load(files.credentials["device-0"])
    (root / "data.jsonl").write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    cfg = EdgeConfig(device_id="device-0", broker=f"mqtts://127.0.0.1:{port}", data=str(root / "data.jsonl"),
                     student=tiny_models["student"], work_dir=str(root / "work"), username=login.username,
                     password=login.password, ca_file=login.ca_file, keys=keys["device-0"], aggregator_keys=keys["aggregator_pub"],
                     authority_keys=keys["authority_pub"], cert=keys["device-0_cert"])
    yield cfg, root, keys
    proc.terminate()
    proc.wait(10)


def _verdicts(cfg: EdgeConfig, login: bool = False) -> dict[str, doctor.Check]:
    return {c.name: c for c in doctor.run(cfg, broker_timeout=5.0, login=login)}


def test_a_healthy_device_passes_every_check_and_the_cli_exits_0(device, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg, _, _ = device
    got = _verdicts(cfg, login=True)
    assert {n: c.verdict for n, c in got.items() if c.verdict != doctor.OK} == {}, [c.line() for c in got.values()]
    assert "logged in as" in got["broker"].detail and "TLS verified" in got["broker"].detail
    path = tmp_path / "device.json"
    path.write_text(__import__("json").dumps(dataclasses.asdict(cfg)))
    assert fl_edge(["doctor", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[  ok] keys:" in out and "0 failed" in out


def _fails(cfg: EdgeConfig, name: str, text: str, login: bool = False) -> None:
    got = _verdicts(cfg, login)
    c = got[name]
    assert c.verdict == doctor.FAIL and text in c.detail, c.line()
    others = [x.line() for x in got.values() if x.verdict == doctor.FAIL and x.name != name]
    assert not others, others  # the line names this cause, not a cascade


def test_key_permissions(device, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, _, _ = device
    loose = tmp_path / "device.key"
    shutil.copy(cfg.keys, loose)
    os.chmod(loose, 0o644)
    _fails(dataclasses.replace(cfg, keys=str(loose)), "keys", "has mode 0644")


def test_a_certificate_from_another_authority_or_for_other_keys(device, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fl_sim.run import make_keys

    cfg, _, _ = device
    other = make_keys(tmp_path / "keys", ["device-0"])
    _fails(dataclasses.replace(cfg, authority_keys=other["authority_pub"]), "certificate", cfg.cert)
    _fails(dataclasses.replace(cfg, cert=other["device-0_cert"], authority_keys=other["authority_pub"]), "certificate",
           "certifies other keys")


def test_an_expired_and_a_not_yet_valid_certificate(device, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import time

    from shared import authority
    from shared.crypto import load_private_keys, load_public_keys

    cfg, root, keys = device
    auth = load_private_keys(keys["authority_key"])
    mine = load_public_keys(Path(cfg.keys).with_suffix(".pub.json"))
    for name, start, days, text in (("expired", time.time() - 3 * 86400, 1, "expired at"),
                                    ("future", time.time() + 86400, 30, "not valid until")):
        cert = tmp_path / f"{name}.cert.json"
        cert.write_text(authority.certify("device-0", mine, auth, days=days, not_before=start).to_json())
        _fails(dataclasses.replace(cfg, cert=str(cert)), "certificate", text)


def test_an_unreachable_broker_a_wrong_ca_and_a_wrong_password(device, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from shared.crypto import make_server_tls
    from tests.brokers import free_port

    cfg, _, _ = device
    _fails(dataclasses.replace(cfg, broker=f"mqtts://127.0.0.1:{free_port()}"), "broker", "unreachable")
    ca = tmp_path / "other-ca.pem"
    ca.write_bytes(make_server_tls("127.0.0.1").ca_cert_pem)
    _fails(dataclasses.replace(cfg, ca_file=str(ca)), "broker", "not from this CA")
    _fails(dataclasses.replace(cfg, password="wrong"), "broker", "refused", login=True)


def test_a_missing_gpu_and_a_student_too_large_for_the_profile(device, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import torch

    cfg, _, _ = device
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the missing-GPU case cannot be injected")
    gpu_profile = next(p for p in sorted(PROFILES.glob("*.toml")) if "compute_capability = \"" in p.read_text()
                       and 'compute_capability = ""' not in p.read_text())
    _fails(dataclasses.replace(cfg, profile=str(gpu_profile), device="cuda"), "gpu", "sees none")
    tiny = tmp_path / "tiny.toml"
    text = (PROFILES / "cpu-dev.toml").read_text()
    tiny.write_text("\n".join("memory_gb = 0.001" if line.startswith("memory_gb") else line for line in text.splitlines()) + "\n")
    _fails(dataclasses.replace(cfg, profile=str(tiny)), "memory plan", "does not fit profile")


def test_a_tampered_release_and_a_tampered_ledger(device, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from edge_client.releases import ReleaseStore
    from shared import ledger, release
    from shared.crypto import load_private_keys

    cfg, root, keys = device
    agg = load_private_keys(keys["aggregator"])
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "model.onnx").write_bytes(b"onnx bytes")
    m = release.ReleaseManifest(release_id="r0001-fedit", fleet=cfg.fleet, round=1, mode="fedit", base_model="b",
                                tokenizer_sha256="0" * 64, quantization="none", files=release.describe(staged))
    rel_root = tmp_path / "releases"
    ReleaseStore(rel_root, agg.public, cfg.fleet).install(staged, release.sign(m, agg))
    c2 = dataclasses.replace(cfg, releases_dir=str(rel_root), work_dir=str(tmp_path / "work"))
    assert _verdicts(c2)["release"].verdict == doctor.OK
    (rel_root / "r0001-fedit" / "model.onnx").write_bytes(b"tampered!!")
    _fails(c2, "release", "does not verify")
    lg = ledger.Ledger(tmp_path / "work" / "ledger.jsonl", "device-0", load_private_keys(cfg.keys))
    lg.append("status", 1, 1, "", {})
    lines = lg.path.read_bytes().splitlines()
    lg.path.write_bytes(lines[1] + b"\n")
    got = _verdicts(dataclasses.replace(c2, releases_dir=None))
    assert got["ledger"].verdict == doctor.FAIL and "does not verify" in got["ledger"].detail


def test_a_clock_behind_the_brokers_ca_is_named(device, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import time

    cfg, _, _ = device
    now = time.time()
    monkeypatch.setattr(doctor.time, "time", lambda: now - 3 * 86400)  # three days behind: before the CA's window
    got = _verdicts(cfg)
    assert got["broker"].verdict == doctor.FAIL and "this clock is behind" in got["broker"].detail, got["broker"].line()
    # The device certificate's window starts an hour before it was signed: the same clock is named there.
    assert got["certificate"].verdict == doctor.FAIL and "not valid until" in got["certificate"].detail
    assert "this clock says" in got["certificate"].detail
    assert {c.name for c in got.values() if c.verdict == doctor.FAIL} == {"certificate", "broker"}
