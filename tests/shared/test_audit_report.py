"""``fl-audit report`` (issue 24, part): the cross-check as one self-contained HTML page.

The ledgers and the aggregator's log are built as in ``test_audit_check``; ``tests/test_secure_e2e.py``
checks the page a real simulated run writes. The browser test opens the page in headless Chromium
(Debian's ``chromium``; ``.ci/run`` installs it) and skips, saying so, without it.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from shared import ledger
from shared.audit_cli import main as audit
from shared.audit_report import NO_DP, REPORT_FILE, write_report
from shared.crypto import generate_keys, save_public_keys
from tests.shared.test_audit_check import _fleet

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
DATA_URI = re.compile(r'src="data:(image/[a-z+]+);base64,([A-Za-z0-9+/=]+)"')
SVG = "{http://www.w3.org/2000/svg}"


def _cli_args(tmp_path: Path, path: Path, key, devs) -> list[str]:  # type: ignore[no-untyped-def]
    args = ["report", "--aggregator-log", str(path), "--aggregator-key", str(save_public_keys(key.public, tmp_path / "agg.pub.json"))]
    for d, (p, k) in devs.items():
        args += ["--device", d, str(p), str(save_public_keys(k.public, tmp_path / f"{d}.pub.json"))]
    return [*args, "--out", str(tmp_path / "report")]


def _plots(page: str) -> list[ET.Element]:
    """Each embedded plot, decoded and parsed; it must have a size and something drawn on it."""
    out = []
    for mime, data in DATA_URI.findall(page):
        assert mime == "image/svg+xml"
        svg = ET.fromstring(base64.b64decode(data, validate=True))
        assert svg.tag == f"{SVG}svg" and float(svg.get("width", 0)) > 0 and float(svg.get("height", 0)) > 0
        marks = [e for e in svg.iter() if e.get("class") == "mark"]
        assert any(float(e.get("height", 0)) > 0 or e.tag in (f"{SVG}circle", f"{SVG}polyline") for e in marks), "a blank plot"
        out.append(svg)
    return out


def test_report_of_agreeing_sides(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path, key, devs = _fleet(tmp_path, {"d0": [1, 2], "d1": [1, 2, 3]})
    assert audit(_cli_args(tmp_path, path, key, devs)) == 0
    assert f"report: {tmp_path / 'report' / REPORT_FILE}" in capsys.readouterr().out
    page = (tmp_path / "report" / REPORT_FILE).read_text()
    assert "PASSED: both sides agree" in page and NO_DP in page
    assert "d1: timeout" in page  # the dropout and its reason
    assert "d0: 110 bytes (masked_update, secagg)" in page  # what d0's ledger says it sent in a round
    assert page.count("<td>aggregate only</td>") == 3 and page.count(">verified<") == 2
    assert len(_plots(page)) == 2  # bytes per round per device, participation per round; no epsilon without DP
    # Self-contained: nothing to fetch, nothing to run.
    assert not re.search(r'(?:src|href)="(?!data:)', page) and "<script" not in page
    assert "Content-Security-Policy" in page


def test_a_tampered_ledger_fails_the_page_and_the_exit_code(tmp_path: Path) -> None:
    path, key, devs = _fleet(tmp_path / "added", {"d0": [1, 2], "d1": [1, 2, 7]})  # an update in a round the aggregator never held
    assert audit(_cli_args(tmp_path / "added", path, key, devs)) == 1
    page = (tmp_path / "added" / "report" / REPORT_FILE).read_text()
    assert "FAILED: 1 problem found" in page and "round 7: d1 sent 1 update(s)" in page
    assert "<td>7</td><td class='bad'>not in the aggregator's log</td>" in page

    path, key, devs = _fleet(tmp_path, {"d0": [1, 2], "d1": [1, 2, 3]})
    lines = Path(devs["d0"][0]).read_bytes().splitlines()
    Path(devs["d0"][0]).write_bytes(b"\n".join(lines[:2] + lines[3:]) + b"\n")  # one entry deleted
    assert audit(_cli_args(tmp_path, path, key, devs)) == 1
    page = (tmp_path / "report" / REPORT_FILE).read_text()
    assert "FAILED: 1 problem found" in page and "PASSED" not in page
    assert html.escape("d0's ledger does not verify: line 3") in page and "DOES NOT VERIFY" in page
    # The aggregator's log signed by another key: nothing in it is shown as fact.
    args = _cli_args(tmp_path, path, key, devs)
    args[args.index("--aggregator-key") + 1] = str(save_public_keys(generate_keys().public, tmp_path / "other.pub.json"))
    assert audit(args) == 1
    page = (tmp_path / "report" / REPORT_FILE).read_text()
    assert "the aggregator&#x27;s audit log does not verify" in page and "Not shown" in page
    assert audit([*args[:-2], "--out", str(tmp_path / "r2"), "--metrics", str(tmp_path / "none.jsonl")]) == 2


HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


def test_hostile_strings_from_the_logs_are_escaped(tmp_path: Path) -> None:
    agg_key, dev_key = generate_keys(), generate_keys()
    agg = ledger.Ledger(tmp_path / "audit.jsonl", "aggregator", agg_key)
    agg.append("round", 1, 0, "", {"status": HOSTILE, "participants": ["d0", HOSTILE], "received": ["d0"],
                                   "drop_reasons": {HOSTILE: HOSTILE}, "decrypted": HOSTILE, "model_sha256": HOSTILE})
    agg.append("release", 1, 5, HOSTILE, {"release_id": HOSTILE, "files": {HOSTILE: HOSTILE}, "note": HOSTILE})
    agg.append("delivery", 1, 0, "", {"release_id": HOSTILE, "outcome": {HOSTILE: HOSTILE}})
    dev = ledger.Ledger(tmp_path / "d0.jsonl", "d0", dev_key)
    dev.append("masked_update", 1, 100, "11" * 32, {"note": HOSTILE})
    dev.append(HOSTILE, 1, 7, HOSTILE, {})
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1, "epsilon": {HOSTILE: 1.5}}) + "\n")
    page_path, check = write_report(tmp_path / "r", agg.path, agg_key.public, {"d0": (dev.path, dev_key.public)},
                                    metrics=tmp_path / "metrics.jsonl")
    page = page_path.read_text()
    assert check["ok"]
    assert "<script" not in page and "<img src=x" not in page and HOSTILE not in page
    assert html.escape(HOSTILE) in page
    plots = _plots(page)  # the epsilon plot's legend holds the hostile name: escaped, so the SVG still parses
    assert len(plots) == 3
    for svg in plots:
        assert not any(e.tag in (f"{SVG}script", f"{SVG}img") for e in svg.iter())


@pytest.mark.parametrize("where", ["metrics", "aggregator log"])
def test_epsilon_per_round_when_present(tmp_path: Path, where: str) -> None:
    agg_key, dev_key = generate_keys(), generate_keys()
    agg = ledger.Ledger(tmp_path / "audit.jsonl", "aggregator", agg_key)
    dev = ledger.Ledger(tmp_path / "d0.jsonl", "d0", dev_key)
    eps = {1: {"untrusted sampling": 1.2, "trusted sampling": 0.7}, 2: {"untrusted sampling": 1.9, "trusted sampling": 1.1}}
    for r in (1, 2):
        dp = {"epsilon": eps[r], "delta": 1e-5} if where == "aggregator log" else {}
        agg.append("round", r, 0, "", {"status": "ok", "participants": ["d0"], "received": ["d0"], "drop_reasons": {},
                                       "decrypted": "aggregate only", **dp})
        dev.append("masked_update", r, 100, "11" * 32, {})
    rows = [{"round": 0, "status": "baseline"}, *({"round": r, "dp": {"epsilon": eps[r], "delta": 1e-5}} for r in (1, 2))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows) + "not json\n")
    page = write_report(tmp_path / "r", agg.path, agg_key.public, {"d0": (dev.path, dev_key.public)},
                        metrics=tmp_path / "metrics.jsonl")[0].read_text()
    assert NO_DP not in page
    assert "Epsilon after the last round (2) at delta 1e-05: <b>trusted sampling 1.1, untrusted sampling 1.9</b>" in page
    assert ("signed audit log" in page) == (where == "aggregator log")
    plots = _plots(page)
    assert len(plots) == 3 and any("epsilon" in "".join(svg.itertext()) for svg in plots)


def _chromium() -> str | None:
    return shutil.which("chromium") or next((p for p in ("/usr/bin/chromium",) if os.access(p, os.X_OK)), None)


@pytest.mark.timeout(120)
def test_report_opens_in_headless_chromium(tmp_path: Path) -> None:
    """No console errors (the page's Content-Security-Policy makes any script or fetch one), every
    plot decoded by the browser with a size, and a screenshot kept."""
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium; .ci/run installs it)")
    path, key, devs = _fleet(tmp_path, {"d0": [1, 2], "d1": [1, 2, 3]})
    page = audit_page = tmp_path / "report" / REPORT_FILE
    assert audit(_cli_args(tmp_path, path, key, devs)) == 0
    base = [browser, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr", "--v=0", "--window-size=1200,2000", "--virtual-time-budget=5000"]
    shot = tmp_path / "report.png"
    run = subprocess.run([*base, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]
    assert console == [], console
    mpimg = pytest.importorskip("matplotlib.image")
    img = mpimg.imread(shot)
    assert img.shape[:2] == (2000, 1200) and img.std() > 0.01  # not a blank page

    # The same page with a probe script (the policy removed, on a copy) that reads back what the browser decoded.
    probe = tmp_path / "probe.html"
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", audit_page.read_text())
    probe.write_text(text.replace("</body>", "<script>addEventListener('load', () => { const p = document.createElement('pre'); "
                                  "p.id = 'probe'; p.textContent = JSON.stringify([...document.images].map(i => [i.complete, "
                                  "i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width])); "
                                  "document.body.appendChild(p); });</script></body>"))
    run = subprocess.run([*base, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=60)
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout)
    assert found, run.stdout[-2000:]
    images = json.loads(html.unescape(found.group(1)))
    assert len(images) == 2 and all(ok and w > 0 and h > 0 and shown > 0 for ok, w, h, shown in images), images

    kept = Path(os.environ.get("FLM_TEST_ARTIFACTS", ROOT / "runs" / "test-artifacts"))
    kept.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, kept / "audit_report.png")
    log.info("screenshot of the audit report: %s (and %s)", kept / "audit_report.png", shot)
