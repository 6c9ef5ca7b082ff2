"""Hold the aggregator's audit log against the devices' ledgers (``shared.ledger``; ``fl-audit check``).

Both sides sign and chain what they record, so neither can rewrite its own side unnoticed; the
cross-check then asks whether the two sides tell the same story about updates:
- every update the aggregator says it counted in a round is in that device's ledger (else the
  aggregator invented one, or the device's ledger lost one);
- every update a device's ledger says it sent is accounted for by the aggregator: counted, or
  dropped with a reason, or sent in a round the aggregator records as not completed (abandoned,
  interrupted).

Devices whose ledger is not given are listed as not checked, never as passing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared import crypto, ledger

UPDATE_KINDS = frozenset({"update", "sparse_update", "masked_update"})
NOT_COMPLETED = frozenset({"abandoned", "interrupted"})


def cross_check(aggregator_log: str | Path, aggregator_key: crypto.PublicKeys,
                devices: Mapping[str, tuple[str | Path, crypto.PublicKeys]]) -> dict[str, Any]:
    """A summary with ``problems`` (empty when both sides agree); each problem is one line."""
    problems: list[str] = []
    try:
        ledger.verify(aggregator_log, aggregator_key)
    except ledger.LedgerError as e:
        return {"ok": False, "problems": [f"the aggregator's audit log does not verify: {e}"], "rounds": {}, "devices": {}}
    rounds: dict[int, dict[str, Any]] = {}
    for _, _, obj in ledger.entries(aggregator_log):
        e = obj["entry"]
        if e["kind"] == "round" and e["round"] > 0:
            rounds[int(e["round"])] = e["detail"]  # a later record of a round (after a restart) is the one that stands
    sent: dict[str, dict[int, int]] = {}
    for dev, (path, key) in sorted(devices.items()):
        try:
            head = ledger.verify(path, key)
        except ledger.LedgerError as e:
            problems.append(f"{dev}'s ledger does not verify: {e}")
            continue
        if head.device != dev:
            problems.append(f"the ledger given for {dev} is {head.device}'s")
            continue
        per: dict[int, int] = {}
        for _, _, obj in ledger.entries(path):
            if obj["entry"]["kind"] in UPDATE_KINDS:
                per[int(obj["entry"]["round"])] = per.get(int(obj["entry"]["round"]), 0) + 1
        sent[dev] = per
    summary: dict[str, dict[str, Any]] = {d: {"sent": 0, "counted": 0, "dropped": 0, "round_not_completed": 0} for d in sent}
    for r, det in sorted(rounds.items()):
        for dev in det.get("received", []):
            if dev in sent:
                if sent[dev].get(r, 0) == 0:
                    problems.append(f"round {r}: the aggregator counted an update from {dev}, which {dev}'s ledger does not hold")
                else:
                    summary[dev]["counted"] += 1
    for dev, per in sent.items():
        for r, n in sorted(per.items()):
            summary[dev]["sent"] += n
            det = rounds.get(r)
            if det is None:
                problems.append(f"round {r}: {dev} sent {n} update(s), a round the aggregator's audit log does not record")
            elif dev in det.get("received", []):
                continue
            elif det.get("status") in NOT_COMPLETED:
                summary[dev]["round_not_completed"] += n
            elif dev in det.get("drop_reasons", {}):
                summary[dev]["dropped"] += n
            else:
                problems.append(f"round {r}: {dev} sent an update that the aggregator neither counted nor dropped with a reason")
    unchecked = sorted({d for det in rounds.values() for d in det.get("participants", [])} - set(devices))
    return {"ok": not problems, "problems": problems, "devices": summary, "not_checked": unchecked,
            "rounds": {r: {"status": d.get("status"), "received": d.get("received", []), "decrypted": d.get("decrypted")}
                       for r, d in sorted(rounds.items())}}
