"""``fl-audit report``: the cross-check (``shared.audit``) as one HTML page a non-programmer can read.

The page says at the top whether the aggregator's audit log and the devices' ledgers tell the
same story, and in plain words what does not match; then, per device, whether its ledger
verifies and what it sent; per round, who took part, who dropped out and why, how many bytes
each device's ledger says it sent, and what the aggregator decrypted; the releases with their
digests; epsilon per round where differential privacy is configured (from the aggregator's
signed log, else from ``metrics.jsonl``); and plots of bytes, participation and epsilon.

Self-contained, so it can be mailed or archived as one file: inline CSS, the plots as SVG data
URIs (``shared.svg_plot``), no script, and a Content-Security-Policy that lets the browser load
nothing else. Everything taken from a ledger, a log or the metrics is escaped: a device signs
whatever it likes into its own ledger, so a ledger is untrusted input even when it verifies.
A ledger that does not verify contributes nothing but the reason.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import crypto, ledger, svg_plot
from shared.audit import cross_check

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
NO_DP = "No differential privacy configured: no epsilon."
# The page loads nothing and runs nothing; a browser reports any attempt as a console error.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.8em;border-bottom:1px solid #ccc}
.meta{color:#555;font-size:.9em}
.verdict{padding:1em 1.2em;border-radius:6px;margin:1em 0;border:2px solid}
.verdict h2{margin:0 0 .3em;border:0;font-size:1.4em}
.pass{background:#e8f5e9;border-color:#2e7d32} .fail{background:#ffebee;border-color:#c62828}
.warn{background:#fff8e1;border-color:#f9a825}
table{border-collapse:collapse;width:100%;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;white-space:nowrap}
.bad{color:#c62828;font-weight:bold} .ok{color:#2e7d32;font-weight:bold}
code,.hash{font-family:ui-monospace,monospace;font-size:.85em;word-break:break-all}
figure{margin:1em 0} img{max-width:100%;height:auto;border:1px solid #ddd}
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _int(x: Any) -> int:
    v = _num(x)
    return int(v) if v is not None else 0


def _dict(x: Any) -> dict[str, Any]:
    return {str(k): v for k, v in x.items()} if isinstance(x, dict) else {}


def _strs(x: Any) -> list[str]:
    return [str(v) for v in x] if isinstance(x, list) else []


@dataclass
class DeviceSide:
    """What one device's ledger says, or why it says nothing (``error``)."""

    device: str
    path: str
    key: str  # the given public key's fingerprint
    error: str | None = None
    entries: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    head: tuple[int, str] | None = None
    sent: dict[int, list[tuple[str, int]]] = field(default_factory=dict)  # round -> [(kind, bytes)]; round 0: outside rounds


@dataclass
class AggregatorSide:
    path: str
    key: str
    error: str | None = None
    head: tuple[int, str] | None = None
    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)  # round -> the round entry's detail (the last one stands)
    releases: list[dict[str, Any]] = field(default_factory=list)
    deliveries: dict[str, dict[str, str]] = field(default_factory=dict)  # release id -> device -> outcome


def device_side(device: str, path: str | Path, key: crypto.PublicKeys) -> DeviceSide:
    side = DeviceSide(device, str(path), key.fingerprint())
    try:
        head = ledger.verify(path, key)
        if head.device != device:
            raise ledger.LedgerError(f"it is the ledger of {head.device!r}, not of {device!r}")
        for _, _, obj in ledger.entries(path):
            e = obj["entry"]
            if e.get("kind") != "genesis":
                side.sent.setdefault(max(_int(e.get("round")), 0), []).append((str(e.get("kind")), _int(e.get("bytes"))))
    except (ledger.LedgerError, OSError) as err:
        side.error = str(err)
        side.sent = {}
        return side
    side.entries, side.kinds, side.bytes, side.head = head.entries, dict(head.kinds), head.bytes, (head.seq, head.hash)
    return side


def aggregator_side(path: str | Path, key: crypto.PublicKeys) -> AggregatorSide:
    side = AggregatorSide(str(path), key.fingerprint())
    try:
        head = ledger.verify(path, key)
        side.head = (head.seq, head.hash)
        for _, _, obj in ledger.entries(path):
            e, rnd = obj["entry"], _int(obj["entry"].get("round"))
            det = _dict(e.get("detail"))
            if e.get("kind") == "round" and rnd > 0:
                side.rounds[rnd] = det  # a later record of a round (after a restart) is the one that stands
            elif e.get("kind") == "release":
                side.releases.append({"round": rnd, "bytes": _int(e.get("bytes")), "sha256": str(e.get("sha256", "")), **det})
            elif e.get("kind") == "delivery":
                side.deliveries.setdefault(str(det.get("release_id")), {}).update(
                    {str(d): str(o) for d, o in _dict(det.get("outcome")).items()})
    except (ledger.LedgerError, OSError) as err:
        side.error, side.rounds, side.releases, side.deliveries = str(err), {}, [], {}
    return side


def _epsilon(v: Any) -> dict[str, float]:
    """Epsilon under a name each: a number is "epsilon"; a mapping gives each number in it, or each
    sub-mapping's "epsilon", under its key (e.g. with and without trusting the aggregator's sampling)."""
    if _num(v) is not None:
        return {"epsilon": float(v)}
    out: dict[str, float] = {}
    for k, x in _dict(v).items():
        if _num(x) is not None:
            out[k] = float(x)
        elif _num(_dict(x).get("epsilon")) is not None:
            out[k] = float(_dict(x)["epsilon"])
    return out


def _privacy(rec: Mapping[str, Any]) -> tuple[dict[str, float], float | None]:
    dp = _dict(rec.get("dp"))
    eps = _epsilon(rec["epsilon"]) if "epsilon" in rec else _epsilon(dp.get("epsilon"))
    return eps, _num(rec.get("delta", dp.get("delta")))


def epsilons(agg: AggregatorSide, metrics: str | Path | None) -> tuple[dict[int, dict[str, float]], dict[int, float], str]:
    """Epsilon (and delta) per round, and where they came from: the aggregator's signed log if it
    records any, else ``metrics.jsonl`` (not signed); empty when no round records one."""
    eps: dict[int, dict[str, float]] = {}
    delta: dict[int, float] = {}
    for r, det in agg.rounds.items():
        e, d = _privacy(det)
        if e:
            eps[r] = e
        if d is not None:
            delta[r] = d
    if eps:
        return eps, delta, "the aggregator's signed audit log"
    if metrics is None or not Path(metrics).is_file():
        return {}, {}, ""
    for no, line in enumerate(Path(metrics).read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            log.warning("%s line %d: not JSON; skipped", metrics, no)
            continue
        r = _int(rec.get("round")) if isinstance(rec, dict) else 0
        if r > 0:
            e, d = _privacy(rec)
            if e:
                eps[r] = e
            if d is not None:
                delta[r] = d
    return eps, delta, f"{metrics} (the aggregator's metrics, not signed)" if eps else ""


def _verdict(check: Mapping[str, Any], devices: list[DeviceSide]) -> tuple[str, str, list[str]]:
    """(css class, headline, lines) in plain words."""
    if not check["ok"]:
        n = len(check["problems"])
        return "fail", f"FAILED: {n} problem{'s' if n > 1 else ''} found", [str(p) for p in check["problems"]]
    if not devices:
        return "warn", "NOTHING CHECKED: no device ledger was given", [
            "The aggregator's audit log verifies, but without the devices' ledgers nothing can be held against it."]
    lines = [f"The aggregator's audit log and the ledgers of {len(devices)} device(s) agree: every update the aggregator "
             "counted is in the sending device's ledger, and every update a ledger records is accounted for (counted, "
             "dropped with a reason, or sent in a round that did not complete). Every log and ledger verifies: no entry "
             "was edited, deleted, inserted or moved."]
    if check.get("not_checked"):
        lines.append("Not checked, because their ledgers were not given: " + ", ".join(check["not_checked"]) + ".")
        return "warn", "PASSED for the devices given; some devices were NOT CHECKED", lines
    return "pass", "PASSED: both sides agree", lines


def _data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


def _figure(svg: str, alt: str, caption: str) -> str:
    return f'<figure><img src="{_data_uri(svg)}" alt="{_e(alt)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _short(h: str) -> str:
    return f'<span class="hash" title="{_e(h)}">{_e(h[:16])}…</span>' if len(h) > 16 else f'<span class="hash">{_e(h)}</span>'


def _sent_cell(items: list[tuple[str, int]]) -> str:
    kinds: dict[str, int] = {}
    for k, _ in items:
        kinds[k] = kinds.get(k, 0) + 1
    what = ", ".join(k if n == 1 else f"{k} ×{n}" for k, n in sorted(kinds.items()))
    return f"{sum(b for _, b in items):,} bytes ({what})"


def _fmt_eps(e: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(e.items()))


def _devices_table(devices: list[DeviceSide], check: Mapping[str, Any]) -> list[str]:
    out = ["<h2>Devices</h2>", "<p>Each device keeps its own signed, chained ledger of every message it sent. "
           "Bytes are the sizes of the exact messages handed to the broker.</p>",
           "<table><tr><th>device</th><th>ledger</th><th>entries</th><th>messages by kind</th><th>bytes sent</th>"
           "<th>updates sent / counted / dropped with a reason / in rounds not completed</th><th>head (seq, hash)</th></tr>"]
    for d in devices:
        s = check["devices"].get(d.device)
        ok = (f'<span class="ok">verified</span> <span class="meta">key {_e(d.key)}</span>' if d.error is None
              else f'<span class="bad">DOES NOT VERIFY</span>: {_e(d.error)}')
        counts = (f"{s['sent']} / {s['counted']} / {s['dropped']} / {s['round_not_completed']}" if s else "")
        kinds = ", ".join(f"{_e(k)} {n}" for k, n in sorted(d.kinds.items()))
        head = f"{d.head[0]}, {_short(d.head[1])}" if d.head else ""
        out.append(f"<tr><td>{_e(d.device)}<br><code>{_e(d.path)}</code></td><td>{ok}</td><td class='num'>{d.entries}</td>"
                   f"<td>{kinds}</td><td class='num'>{d.bytes:,}</td><td>{counts}</td><td>{head}</td></tr>")
    for d in check.get("not_checked", []):
        out.append(f"<tr><td>{_e(d)}</td><td class='bad'>not checked: no ledger given</td><td></td><td></td><td></td><td></td>"
                   "<td></td></tr>")
    return [*out, "</table>"]


def _rounds_table(agg: AggregatorSide, devices: list[DeviceSide], eps: Mapping[int, Mapping[str, float]]) -> list[str]:
    out = ["<h2>Rounds</h2>",
           "<p><b>Participants</b>: the devices the aggregator asked. <b>Counted</b>: whose update went into the round. "
           "<b>Dropped out</b>: participants not counted, with the reason the aggregator recorded. <b>Sent</b>: what each "
           "device's own ledger says it sent in the round. <b>Decrypted</b>: what the aggregator saw in clear "
           "(<i>aggregate only</i> under secure aggregation: the sum, never one device's update).</p>",
           "<table><tr><th>round</th><th>status</th><th>participants</th><th>counted</th><th>dropped out (reason)</th>"
           "<th>sent, per device ledger</th><th>decrypted</th><th>model digest</th>"
           + ("<th>epsilon</th>" if eps else "") + "</tr>"]
    for r in sorted(set(agg.rounds) | {r for d in devices for r in d.sent if r > 0}):
        det = agg.rounds.get(r)
        sent = "<br>".join(f"{_e(d.device)}: {_e(_sent_cell(d.sent[r]))}" for d in devices if r in d.sent)
        if det is None:
            out.append(f"<tr><td>{r}</td><td class='bad'>not in the aggregator's log</td><td></td><td></td><td></td>"
                       f"<td>{sent}</td><td></td><td></td>" + ("<td></td>" if eps else "") + "</tr>")
            continue
        parts, got, reasons = _strs(det.get("participants")), _strs(det.get("received")), _dict(det.get("drop_reasons"))
        dropped = [d for d in parts if d not in got] + [d for d in reasons if d not in parts and d not in got]
        drops = "<br>".join(f"{_e(d)}: {_e(reasons.get(d, 'no reason recorded'))}" for d in dropped)
        status = _e(det.get("status")) + (f"<br>{_e(det['abandon_reason'])}" if det.get("abandon_reason") else "")
        digest = det.get("model_sha256")
        out.append(f"<tr><td>{r}</td><td>{status}</td><td>{len(parts)}: {_e(', '.join(parts))}</td>"
                   f"<td>{len(got)}: {_e(', '.join(got))}</td><td>{drops}</td><td>{sent}</td><td>{_e(det.get('decrypted', ''))}</td>"
                   f"<td>{_short(str(digest)) if digest else ''}</td>"
                   + (f"<td>{_e(_fmt_eps(eps.get(r, {})))}</td>" if eps else "") + "</tr>")
    outside = "<br>".join(f"{_e(d.device)}: {_e(_sent_cell(d.sent[0]))}" for d in devices if 0 in d.sent)
    if outside:
        out.append(f"<tr><td colspan='5'>outside any round (status messages, release acknowledgements)</td>"
                   f"<td>{outside}</td><td></td><td></td>" + ("<td></td>" if eps else "") + "</tr>")
    return [*out, "</table>"]


def _releases_table(agg: AggregatorSide) -> list[str]:
    out = ["<h2>Releases</h2>"]
    if not agg.releases:
        return [*out, "<p>No release was recorded.</p>"]
    out += ["<p>Each ONNX release of the student the aggregator signed, with the SHA-256 of its signed manifest and of "
            "each file, and the outcome on each device it was sent to.</p>",
            "<table><tr><th>after round</th><th>release</th><th>bytes</th><th>manifest SHA-256</th><th>files (SHA-256)</th>"
            "<th>delivery</th></tr>"]
    for x in agg.releases:
        rid = str(x.get("release_id", ""))
        note = "".join(f"<br>{_e(k.replace('_', ' '))}: {_e(x[k])}" for k in ("rollback_of", "note") if x.get(k))
        files = "<br>".join(f"{_e(n)}: <span class='hash'>{_e(h)}</span>" for n, h in _dict(x.get("files")).items())
        outcome = "<br>".join(f"{_e(d)}: {_e(o)}" for d, o in sorted(agg.deliveries.get(rid, {}).items()))
        out.append(f"<tr><td>{_int(x.get('round'))}</td><td>{_e(rid)}{note}</td><td class='num'>{_int(x.get('bytes')):,}</td>"
                   f"<td><span class='hash'>{_e(x.get('sha256', ''))}</span></td><td>{files}</td><td>{outcome}</td></tr>")
    return [*out, "</table>"]


def _plots(agg: AggregatorSide, devices: list[DeviceSide], eps: Mapping[int, Mapping[str, float]]) -> list[str]:
    rounds = sorted(set(agg.rounds) | {r for d in devices for r in d.sent if r > 0})
    ok = [d for d in devices if d.error is None]
    sent = {d.device: [float(sum(b for _, b in d.sent.get(r, []))) for r in rounds] for d in ok}
    peak = max((v for row in sent.values() for v in row), default=0.0)
    unit, scale = ("bytes", 1.0) if peak < 1e4 else ("kB", 1e3) if peak < 1e7 else ("MB", 1e6)
    out = ["<h2>Plots</h2>",
           _figure(svg_plot.bars("bytes sent per round, per device", [str(r) for r in rounds],
                                 {d: [v / scale for v in row] for d, row in sent.items()},
                                 ylabel=f"{unit} (device ledgers)", xlabel="round"),
                   "bytes sent per round per device",
                   "What each device's own ledger says it sent in each round (updates, key exchange, status messages).")]
    counted = [float(len(_strs(agg.rounds.get(r, {}).get("received")))) for r in rounds]
    asked = [float(len(_strs(agg.rounds.get(r, {}).get("participants")))) for r in rounds]
    out.append(_figure(svg_plot.bars("participation per round", [str(r) for r in rounds],
                                     {"counted": counted, "dropped out": [max(0.0, a - c) for a, c in zip(asked, counted, strict=True)]},
                                     ylabel="devices", xlabel="round", stacked=True, colors=("#2e7d32", "#c62828")),
                       "participation per round", "Per round: devices whose update was counted, and participants who "
                                                  "dropped out (reasons in the rounds table)."))
    if eps:
        names = sorted({k for e in eps.values() for k in e})
        xs = sorted(eps)
        out.append(_figure(svg_plot.lines("epsilon after each round", xs, {n: [eps[r].get(n) for r in xs] for n in names},
                                          ylabel="epsilon", xlabel="round"),
                           "epsilon per round", "The privacy budget spent so far after each round (lower is more private)."))
    return out


def render(check: Mapping[str, Any], agg: AggregatorSide, devices: list[DeviceSide], eps: Mapping[int, Mapping[str, float]],
           delta: Mapping[int, float], eps_source: str, data_notes: Sequence[str] = ()) -> str:
    cls, headline, lines = _verdict(check, devices)
    made = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>Privacy audit report</title>", f"<style>{CSS}</style></head><body>",
           "<h1>Privacy audit report</h1>",
           f"<p class='meta'>Made {made} by <code>fl-audit report</code> from the aggregator's audit log "
           f"<code>{_e(agg.path)}</code> (key {_e(agg.key)}) and {len(devices)} device ledger(s).</p>",
           f"<div class='verdict {cls}'><h2>{_e(headline)}</h2>" + "".join(f"<p>{_e(x)}</p>" for x in lines) + "</div>",
           "<h2>Differential privacy</h2>"]
    if eps:
        last = max(eps)
        d = f" at delta {delta[last]:.3g}" if last in delta else ""
        out.append(f"<p>Epsilon after the last round ({last}){_e(d)}: <b>{_e(_fmt_eps(eps[last]))}</b>. "
                   f"Source: {_e(eps_source)}.</p>")
    else:
        out.append(f"<p><b>{_e(NO_DP)}</b> Secure aggregation hides each device's update from the aggregator, but the sums "
                   "it decrypts carry no formal privacy guarantee.</p>")
    if agg.error is not None:
        out.append(f"<h2>Rounds and releases</h2><p class='bad'>Not shown: the aggregator's audit log does not verify "
                   f"({_e(agg.error)}), so nothing in it can be relied on.</p>")
        out += _devices_table(devices, check)
    else:
        out += _devices_table(devices, check)
        out += _plots(agg, devices, eps)
        out += _rounds_table(agg, devices, eps)
        out += _releases_table(agg)
    if data_notes:
        # Where the private data was (the simulation says; a real deployment's is on each device).
        out += ["<h2>Where the data is</h2><ul>", *(f"<li>{_e(x)}</li>" for x in data_notes), "</ul>"]
    out += ["<h2>What this check cannot show</h2><ul>",
            "<li>Entries cut off the end of a ledger or log: the chain cannot show them. Compare each head above "
            "(sequence number and hash) with a copy taken earlier.</li>",
            "<li>A device whose ledger was not given: it is listed as not checked, never as passing.</li>",
            "<li>Figures from <code>metrics.jsonl</code> (epsilon, where the audit log has none) are not signed.</li></ul>",
            "</body></html>"]
    return "\n".join(out)


def write_report(out_dir: str | Path, aggregator_log: str | Path, aggregator_key: crypto.PublicKeys,
                 devices: Mapping[str, tuple[str | Path, crypto.PublicKeys]], *, metrics: str | Path | None = None,
                 check: Mapping[str, Any] | None = None, data_notes: Sequence[str] = ()) -> tuple[Path, Mapping[str, Any]]:
    """Write ``out_dir/report.html``; the page's path and the cross-check it shows (``check`` if
    given, as ``fl-sim`` has just run it, else run here)."""
    if check is None:
        check = cross_check(aggregator_log, aggregator_key, devices)
    agg = aggregator_side(aggregator_log, aggregator_key)
    sides = [device_side(d, p, k) for d, (p, k) in sorted(devices.items())]
    eps, delta, source = epsilons(agg, metrics)
    path = Path(out_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(check, agg, sides, eps, delta, source, data_notes), encoding="utf-8")
    return path, check
