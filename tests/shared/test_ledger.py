"""The device ledger (issue 24, part): hash-chained, signed, and every kind of tampering named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared import ledger
from shared import messages as M
from shared.audit_cli import main as audit
from shared.crypto import generate_keys, save_public_keys


def _ledger(tmp_path: Path, n: int = 5):  # type: ignore[no-untyped-def]
    key = generate_keys()
    lg = ledger.Ledger(tmp_path / "ledger.jsonl", "device-0", key)
    for r in range(1, n + 1):
        st = M.DeviceStatus(device_id="device-0", state="online", profile="p", num_examples=0, detail="", release="")
        lg.record("status", r, b"wire bytes %d" % r, st)
    return lg, key


def _lines(p: Path) -> list[bytes]:
    return p.read_bytes().splitlines()


def _write(p: Path, lines: list[bytes]) -> None:
    p.write_bytes(b"".join(x + b"\n" for x in lines))


def test_a_clean_ledger_verifies_and_a_reopened_one_continues_its_chain(tmp_path: Path) -> None:
    lg, key = _ledger(tmp_path)
    head = ledger.verify(lg.path, key.public)
    assert (head.device, head.seq, head.entries, head.kinds) == ("device-0", 5, 6, {"genesis": 1, "status": 5})
    assert head.bytes == sum(len(b"wire bytes %d" % r) for r in range(1, 6))
    again = ledger.Ledger(lg.path, "device-0", key)  # a restarted device
    again.record("status", 6, b"x", "not a message")
    assert ledger.verify(lg.path, key.public).seq == 6
    first = json.loads(_lines(lg.path)[1])["entry"]
    assert first["detail"]["state"] == "online" and first["sha256"] and first["round"] == 1


@pytest.mark.parametrize("tamper, names", [
    ("edit", "line 3 (seq 2, 'status'): the entry differs from what the device signed"),
    ("delete", "line 3 (seq 3, 'status'): its chain link does not match"),
    ("reorder", "line 3 (seq 3, 'status'): its chain link does not match"),
    ("insert", "line 3 (seq 2, 'status'): signature does not verify"),
    ("reformat", "line 2 (seq 1, 'status'): not in canonical form"),
    ("other-key", "line 1 (seq 0, 'genesis'): the ledger names key"),
])
def test_each_kind_of_tampering_is_detected_and_the_first_bad_line_named(tmp_path: Path, tamper: str, names: str) -> None:
    lg, key = _ledger(tmp_path)
    lines = _lines(lg.path)
    if tamper == "edit":  # a smaller byte count, in canonical form, signature left as it was
        obj = json.loads(lines[2])
        obj["entry"]["bytes"] = 1
        lines[2] = ledger.canonical(obj)
    elif tamper == "delete":
        del lines[2]
    elif tamper == "reorder":
        lines[2], lines[3] = lines[3], lines[2]
    elif tamper == "insert":  # a well-chained line signed with another key, then the rest re-chained cannot be
        forger = ledger.Ledger(tmp_path / "forged.jsonl", "device-0", generate_keys())
        forger.seq, forger.prev = 1, ledger.line_hash(lines[1])
        forger.record("status", 1, b"never sent", "x")
        lines.insert(2, _lines(forger.path)[-1])
    elif tamper == "reformat":
        lines[1] = json.dumps(json.loads(lines[1]), indent=1).replace("\n", "").encode()
    if tamper == "other-key":
        key = generate_keys()
    else:
        _write(lg.path, lines)
    with pytest.raises(ledger.LedgerError) as e:
        ledger.verify(lg.path, key.public)
    assert names in str(e.value)


def test_lines_cut_off_the_end_change_the_head(tmp_path: Path) -> None:
    """The chain alone cannot show a cut tail (nothing after it to break): the head does."""
    lg, key = _ledger(tmp_path)
    before = ledger.verify(lg.path, key.public)
    _write(lg.path, _lines(lg.path)[:-1])
    after = ledger.verify(lg.path, key.public)
    assert (after.seq, after.hash) != (before.seq, before.hash)


def test_a_damaged_ledger_is_set_aside_as_evidence_and_a_new_one_names_it(tmp_path: Path) -> None:
    lg, key = _ledger(tmp_path)
    lines = _lines(lg.path)
    del lines[2]
    _write(lg.path, lines)
    fresh = ledger.Ledger(lg.path, "device-0", key)
    aside = list(tmp_path.glob("ledger.jsonl.damaged-*"))
    assert len(aside) == 1 and _lines(aside[0]) == lines
    assert ledger.verify(fresh.path, key.public).seq == 0
    assert json.loads(_lines(fresh.path)[0])["entry"]["detail"]["previous_ledger_damaged"] == aside[0].name


def test_fl_audit_verify_exits_0_1_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    lg, key = _ledger(tmp_path)
    pub = save_public_keys(key.public, tmp_path / "device-0.pub.json")
    assert audit(["verify", str(lg.path), "--key", str(pub), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] and out["entries"] == 6 and out["rounds"] == [1, 2, 3, 4, 5]
    lines = _lines(lg.path)
    del lines[3]
    _write(lg.path, lines)
    assert audit(["verify", str(lg.path), "--key", str(pub)]) == 1
    assert "DOES NOT VERIFY: line 4 (seq 4" in caplog.text
    assert audit(["verify", str(tmp_path / "none.jsonl"), "--key", str(pub)]) == 2
    assert audit(["verify", str(lg.path), "--key", str(tmp_path / "missing.json")]) == 2
