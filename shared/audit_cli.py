"""``fl-audit``: what a privacy auditor runs on a device's ledger (``shared.ledger``).

    fl-audit verify LEDGER --key DEVICE_PUBLIC_KEY_FILE
    fl-audit check --aggregator-log OUT/audit.jsonl --aggregator-key AGG_PUB --device ID LEDGER KEY ...
    fl-audit report --aggregator-log OUT/audit.jsonl --aggregator-key AGG_PUB --device ID LEDGER KEY ... --out DIR

checks every line's chain link, sequence number and signature, prints what the ledger records
(entries by kind, bytes, the rounds), and its head (last sequence number and line hash) to compare
with a copy taken earlier; exit 0. On any edit, deletion, reordering or insertion: one line
naming the first bad line, exit 1. A missing file or key: one line, exit 2. ``check`` holds the
aggregator's audit log against the devices' ledgers (``shared.audit``): exit 1 on any mismatch.
``report`` does the same check and writes it as one self-contained HTML page, DIR/report.html
(``shared.audit_report``), with the same exit codes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("fl-audit")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fl-audit", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check a device ledger's chain and signatures")
    v.add_argument("ledger", help="the device's ledger (WORK_DIR/ledger.jsonl)")
    v.add_argument("--key", required=True, help="the device's PUBLIC key file (fl-edge keygen wrote it beside the private one)")
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    c = sub.add_parser("check", help="hold the aggregator's audit log against the devices' ledgers")
    r = sub.add_parser("report", help="the same check, written as one self-contained HTML page (DIR/report.html)")
    for p in (c, r):
        p.add_argument("--aggregator-log", required=True, help="the aggregator's OUT_DIR/audit.jsonl")
        p.add_argument("--aggregator-key", required=True, help="the aggregator's PUBLIC key file")
        p.add_argument("--device", nargs=3, action="append", default=[], metavar=("DEVICE_ID", "LEDGER", "KEY"),
                       help="a device, its ledger and its public key file (repeat for each device)")
    c.add_argument("--out", default=None, help="also write the summary as JSON to this file")
    r.add_argument("--out", required=True, help="the directory to write report.html into (created if missing)")
    r.add_argument("--metrics", default=None,
                   help="the aggregator's OUT_DIR/metrics.jsonl: epsilon per round from there when the audit log has none")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from shared import ledger
    from shared.crypto import load_public_keys
    from shared.errors import ConfigError, ProtocolError

    if a.cmd in ("check", "report"):
        return _check(a)

    try:
        public = load_public_keys(a.key)
    except (OSError, ConfigError, ProtocolError, ValueError) as e:
        log.error("fl-audit: cannot read the device key %s: %s", a.key, e)
        return 2
    if not Path(a.ledger).is_file():
        log.error("fl-audit: %s: no such ledger file", a.ledger)
        return 2
    try:
        head = ledger.verify(a.ledger, public)
    except ledger.LedgerError as e:
        log.error("fl-audit: %s: DOES NOT VERIFY: %s", a.ledger, e)
        return 1
    except OSError as e:
        log.error("fl-audit: cannot read %s: %s", a.ledger, e)
        return 2
    rounds = sorted({int(obj["entry"]["round"]) for _, _, obj in ledger.entries(a.ledger) if obj["entry"]["round"]})
    summary = {"ledger": a.ledger, "verified": True, "device": head.device, "entries": head.entries, "kinds": dict(head.kinds),
               "bytes": head.bytes, "rounds": rounds, "head": {"seq": head.seq, "sha256": head.hash}}
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(head.kinds.items()))
        print(f"{a.ledger}: verified: {head.entries} entries of {head.device} ({kinds}), {head.bytes:,} bytes sent, "
              f"rounds {rounds[0] if rounds else '-'}..{rounds[-1] if rounds else '-'}; head seq {head.seq} sha256 {head.hash}")
    return 0


def _check(a: argparse.Namespace) -> int:
    """``check`` and ``report``: the summary printed, and the JSON or the HTML page written."""
    from shared.audit import cross_check
    from shared.audit_report import write_report
    from shared.crypto import load_public_keys
    from shared.errors import ConfigError, ProtocolError

    try:
        agg_key = load_public_keys(a.aggregator_key)
        devices = {d: (path, load_public_keys(key)) for d, path, key in a.device}
    except (OSError, ConfigError, ProtocolError, ValueError) as e:
        log.error("fl-audit: cannot read a key: %s", e)
        return 2
    missing = [p for p in [a.aggregator_log, *(path for path, _ in devices.values())] if not Path(p).is_file()]
    if missing:
        log.error("fl-audit: no such file: %s", ", ".join(missing))
        return 2
    if a.cmd == "report" and a.metrics and not Path(a.metrics).is_file():
        log.error("fl-audit: no such file: %s", a.metrics)
        return 2
    out = cross_check(a.aggregator_log, agg_key, devices)
    if a.cmd == "report":
        page, _ = write_report(a.out, a.aggregator_log, agg_key, devices, metrics=a.metrics, check=out)
        print(f"report: {page}")
    elif a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))
    for d, s in out["devices"].items():
        print(f"{d}: {s['sent']} update(s) sent, {s['counted']} counted, {s['dropped']} dropped with a reason, "
              f"{s['round_not_completed']} in rounds that did not complete")
    if out.get("not_checked"):
        print(f"not checked (no ledger given): {', '.join(out['not_checked'])}")
    for p in out["problems"]:
        log.error("fl-audit: MISMATCH: %s", p)
    print("the aggregator's log and the devices' ledgers agree" if out["ok"] else f"{len(out['problems'])} mismatch(es)")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
