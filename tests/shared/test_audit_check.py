"""``fl-audit check`` (issue 24, part): the aggregator's audit log held against the devices' ledgers."""

from __future__ import annotations

import json
from pathlib import Path

from shared import ledger
from shared.audit import cross_check
from shared.audit_cli import main as audit
from shared.crypto import generate_keys, save_public_keys

ROUNDS = {1: ("ok", ["d0", "d1"], {}), 2: ("ok", ["d0"], {"d1": "timeout"}), 3: ("interrupted", [], {})}


def _fleet(tmp_path: Path, sends: dict[str, list[int]]):  # type: ignore[no-untyped-def]
    agg_key = generate_keys()
    log = ledger.Ledger(tmp_path / "audit.jsonl", "aggregator", agg_key)
    for r, (status, received, reasons) in ROUNDS.items():
        log.append("round", r, 0, "", {"status": status, "participants": ["d0", "d1"] if status == "ok" else [],
                                       "received": received, "drop_reasons": reasons, "decrypted": "aggregate only"})
    devices = {}
    for d, rounds in sends.items():
        key = generate_keys()
        lg = ledger.Ledger(tmp_path / f"{d}.jsonl", d, key)
        for r in rounds:
            lg.append("secagg", r, 10, "00" * 32, {})
            lg.append("masked_update", r, 100, "11" * 32, {"masked": {"bytes": 100}})
        devices[d] = (lg.path, key)
    return log.path, agg_key, devices


def test_agreeing_sides_pass_and_every_update_is_accounted_for(tmp_path: Path) -> None:
    path, key, devs = _fleet(tmp_path, {"d0": [1, 2], "d1": [1, 2, 3]})
    out = cross_check(path, key.public, {d: (p, k.public) for d, (p, k) in devs.items()})
    assert out["ok"] and out["problems"] == []
    assert out["devices"]["d1"] == {"sent": 3, "counted": 1, "dropped": 1, "round_not_completed": 1}
    assert out["devices"]["d0"] == {"sent": 2, "counted": 2, "dropped": 0, "round_not_completed": 0}


def test_a_removed_or_an_added_update_is_reported(tmp_path: Path) -> None:
    # d0's ledger lacks its round-2 update (removed), d1's holds one for round 7 the aggregator never recorded (added).
    path, key, devs = _fleet(tmp_path, {"d0": [1], "d1": [1, 2, 7]})
    out = cross_check(path, key.public, {d: (p, k.public) for d, (p, k) in devs.items()})
    assert not out["ok"]
    assert out["problems"] == ["round 2: the aggregator counted an update from d0, which d0's ledger does not hold",
                               "round 7: d1 sent 1 update(s), a round the aggregator's audit log does not record"]


def test_an_update_neither_counted_nor_dropped_and_a_tampered_side_are_reported(tmp_path: Path) -> None:
    path, key, devs = _fleet(tmp_path, {"d0": [1, 2], "d1": [1]})
    extra = ledger.Ledger(tmp_path / "d2.jsonl", "d2", generate_keys())
    extra.append("masked_update", 1, 100, "22" * 32, {})
    given = {d: (p, k.public) for d, (p, k) in devs.items()} | {"d2": (extra.path, extra.key.public)}
    out = cross_check(path, key.public, given)
    assert out["problems"] == ["round 1: d2 sent an update that the aggregator neither counted nor dropped with a reason"]
    lines = Path(devs["d0"][0]).read_bytes().splitlines()
    Path(devs["d0"][0]).write_bytes(b"\n".join(lines[:2] + lines[3:]) + b"\n")
    out = cross_check(path, key.public, {d: (p, k.public) for d, (p, k) in devs.items()})
    assert len(out["problems"]) == 1 and out["problems"][0].startswith("d0's ledger does not verify: line 3")
    out = cross_check(path, generate_keys().public, {})
    assert out["problems"][0].startswith("the aggregator's audit log does not verify")


def test_fl_audit_check_cli(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path, key, devs = _fleet(tmp_path, {"d0": [1, 2], "d1": [1, 2, 3]})
    args = ["check", "--aggregator-log", str(path), "--aggregator-key", str(save_public_keys(key.public, tmp_path / "agg.pub.json"))]
    for d, (p, k) in devs.items():
        args += ["--device", d, str(p), str(save_public_keys(k.public, tmp_path / f"{d}.pub.json"))]
    assert audit([*args, "--out", str(tmp_path / "check.json")]) == 0
    assert "agree" in capsys.readouterr().out and json.loads((tmp_path / "check.json").read_text())["ok"]
    assert audit(args[:-4]) == 0  # d1 left out: not checked, not a mismatch
    assert "not checked (no ledger given): d1" in capsys.readouterr().out
    assert audit([*args[:-4], "--device", "d1", *args[-6:-4]]) == 1  # d0's ledger given as d1's
    assert audit([*args[:-4], "--device", "d1", str(tmp_path / "none.jsonl"), args[-1]]) == 2
