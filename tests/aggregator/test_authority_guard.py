"""``fl-agg run`` warns in one line when the aggregator can read the fleet authority's private key
(issue 22, item 6): beside the configured authority public key, or beside its own keys."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from aggregator import authority_guard, cli
from shared.crypto import generate_keys, save_private_keys, save_public_keys, write_keypair
from shared.datasets import Example, write_jsonl

WARNING = "can read the fleet authority's PRIVATE key"


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """The aggregator's keys and the authority's public key in keys/, the authority's key elsewhere."""
    keys = tmp_path / "keys"
    agg_key, _ = write_keypair(keys, "aggregator")
    auth_key, auth_pub = write_keypair(tmp_path / "authority", "authority")
    shutil.copy(auth_pub, keys / "authority.pub.json")
    return {"keys": keys, "agg_key": agg_key, "auth_key": auth_key, "auth_pub": keys / "authority.pub.json"}


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]


def test_no_warning_when_only_the_public_key_is_readable(layout, caplog) -> None:
    save_private_keys(generate_keys(), layout["keys"] / "device-0.key")  # some other private key
    save_public_keys(generate_keys().public, layout["keys"] / "device-0.pub.json")
    (layout["keys"] / "big.bin").write_bytes(b"flm-private-keys" * 10_000)
    (layout["keys"] / "sub").mkdir()
    with caplog.at_level(logging.WARNING):
        assert authority_guard.warn_if_readable(str(layout["auth_pub"]), str(layout["agg_key"])) == []
    assert _warnings(caplog) == []  # not for the aggregator's own key either


@pytest.mark.parametrize("where,mode", [("beside_pub", 0o600), ("beside_pub", 0o644), ("beside_own_keys", 0o600)])
def test_a_readable_authority_key_is_one_warning_line(tmp_path: Path, layout, caplog, where: str, mode: int) -> None:
    auth_pub, own = layout["auth_pub"], layout["agg_key"]
    if where == "beside_own_keys":  # the public key pinned elsewhere; the private one next to ours
        (tmp_path / "pinned").mkdir()
        auth_pub = Path(shutil.copy(auth_pub, tmp_path / "pinned" / "authority.pub.json"))
        (layout["keys"] / "authority.pub.json").unlink()
    leaked = layout["keys"] / "fleet-ca.json"  # whatever its name: recognised by its public half
    shutil.copy(layout["auth_key"], leaked)
    leaked.chmod(mode)
    with caplog.at_level(logging.WARNING):
        assert authority_guard.warn_if_readable(str(auth_pub), str(own)) == [leaked]
    assert len(_warnings(caplog)) == 1 and str(leaked) in _warnings(caplog)[0]


def test_fl_agg_run_warns_before_it_starts(tmp_path: Path, layout, caplog, monkeypatch: pytest.MonkeyPatch) -> None:
    from aggregator import registry, server

    ran: list[object] = []
    monkeypatch.setattr(server.Aggregator, "__init__", lambda self, cfg, fresh=False: ran.append(cfg))
    monkeypatch.setattr(server.Aggregator, "run", lambda self: None)
    registry.enroll(tmp_path / "reg.json", "dev-a", generate_keys().public)
    write_jsonl(tmp_path / "eval.jsonl", [Example("Add.", "1 2", "3", "arith")])
    cfg = tmp_path / "aggregator.json"
    cfg.write_text(json.dumps({"broker": "mqtt://127.0.0.1:1", "student": "unused", "eval_data": str(tmp_path / "eval.jsonl"),
                               "out_dir": str(tmp_path / "out"), "keys": str(layout["agg_key"]),
                               "registry": str(tmp_path / "reg.json"), "authority": str(layout["auth_pub"]), "mode": "fedit"}))
    with caplog.at_level(logging.WARNING):
        assert cli.main(["run", "--config", str(cfg)]) == 0
    assert len(ran) == 1 and _warnings(caplog) == []
    shutil.copy(layout["auth_key"], layout["keys"] / "authority.key")
    with caplog.at_level(logging.WARNING):
        assert cli.main(["run", "--config", str(cfg)]) == 0
    assert len(ran) == 2 and len(_warnings(caplog)) == 1
