"""The simulation report says who left each round and why (issue 11: declined, offline, rejected)."""

from __future__ import annotations

from pathlib import Path

from aggregator.model import EvalSummary, FamilyEval
from aggregator.record import ModelEvals, RoundRecord, append, read
from fl_sim.report import write_report


def _evals(loss: float) -> ModelEvals:
    return ModelEvals(EvalSummary({"arith": FamilyEval(4, loss, 0.25)}, loss, 0.25))


def test_report_lists_devices_that_left_with_their_reasons(tmp_path: Path) -> None:
    devs = ["device-0", "device-1", "device-2"]
    rows = [
        RoundRecord(round=0, status="baseline", mode="fedit", student=_evals(3.0)),
        RoundRecord(round=1, status="ok", mode="fedit", student=_evals(2.5), participants=devs, received=devs[:2],
                    dropped=["device-2"], drop_reasons={"device-2": "declined: non-finite update: 3 of 9 values"},
                    rejected_messages=2),
        RoundRecord(round=2, status="abandoned", mode="fedit", student=_evals(2.5), participants=devs, received=[],
                    dropped=devs, drop_reasons={d: "offline: killed" for d in devs},
                    abandon_reason="0 of 3 updates received, quorum is 1"),
    ]
    for r in rows:
        append(tmp_path / "metrics.jsonl", r)
    back = read(tmp_path / "metrics.jsonl")
    assert back[1].drop_reasons == {"device-2": "declined: non-finite update: 3 of 9 values"}  # survives the JSON
    text = write_report(tmp_path, {"devices": 3}).read_text()
    assert "## Devices that left a round, and why" in text
    assert "| 1 | device-2 | declined: non-finite update: 3 of 9 values |" in text
    assert "| 2 | device-1 | offline: killed |" in text
    assert "round 2 abandoned: 0 of 3 updates received" in text and "round 1: 2" in text


def test_report_without_departures_has_no_such_section(tmp_path: Path) -> None:
    devs = ["device-0"]
    for r in (RoundRecord(round=0, status="baseline", mode="fedit", student=_evals(3.0)),
              RoundRecord(round=1, status="ok", mode="fedit", student=_evals(2.0), participants=devs, received=devs)):
        append(tmp_path / "metrics.jsonl", r)
    assert "left a round" not in write_report(tmp_path, {}).read_text()
