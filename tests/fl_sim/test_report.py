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


def test_report_counts_rounds_voided_by_an_out_of_bounds_sum(tmp_path: Path) -> None:
    """Issue 22: a device can void a secure round with out-of-range values under its masks; the
    report counts how often, beside the reasons."""
    devs = ["device-0", "device-1", "device-2"]
    rows = [RoundRecord(round=0, status="baseline", mode="fedit", student=_evals(3.0))]
    for rnd in (1, 3):
        rows.append(RoundRecord(round=rnd, status="abandoned", mode="fedit", student=_evals(3.0), participants=devs,
                                received=devs, abandon_reason="aggregate rejected: slot 'values' out of bounds: 0.7"))
    rows.append(RoundRecord(round=2, status="ok", mode="fedit", student=_evals(2.0), participants=devs, received=devs))
    for r in rows:
        append(tmp_path / "metrics.jsonl", r)
    text = write_report(tmp_path, {}).read_text()
    assert "rounds voided because the unmasked sum was out of bounds (a device sent out-of-range values under its masks): 2 (1, 3)" in text


def test_report_without_departures_has_no_such_section(tmp_path: Path) -> None:
    devs = ["device-0"]
    for r in (RoundRecord(round=0, status="baseline", mode="fedit", student=_evals(3.0)),
              RoundRecord(round=1, status="ok", mode="fedit", student=_evals(2.0), participants=devs, received=devs)):
        append(tmp_path / "metrics.jsonl", r)
    assert "left a round" not in write_report(tmp_path, {}).read_text()


def test_the_report_puts_the_loss_beside_uniform_and_unigram(tmp_path: Path) -> None:
    """Issue 14: a -40% headline at 7.30 nats/token, where ln 2048 = 7.62, had said nothing of it."""
    import math

    devs = ["device-0"]
    for r in (RoundRecord(round=0, status="baseline", mode="fedit", student=_evals(12.0)),
              RoundRecord(round=1, status="ok", mode="fedit", student=_evals(7.30), participants=devs, received=devs)):
        append(tmp_path / "metrics.jsonl", r)
    b = {"vocab": 2048.0, "uniform": math.log(2048), "unigram": 6.1, "scored": 30, "available": 412, "cap": 30}
    text = write_report(tmp_path, {}, b).read_text()
    assert "| uniform guess over the 2,048-token vocabulary (ln V) | 7.625 |" in text
    assert "does not beat the unigram baseline" in text
    assert "Scored 30 held-out examples of the 412" in text and "--eval-per-family 412" in text
    (tmp_path / "metrics.jsonl").unlink()
    for r in (RoundRecord(round=0, status="baseline", mode="fedit", student=_evals(12.0)),
              RoundRecord(round=1, status="ok", mode="fedit", student=_evals(2.0), participants=devs, received=devs)):
        append(tmp_path / "metrics.jsonl", r)
    assert "beats the unigram baseline by 4.100 nats" in write_report(tmp_path, {}, b).read_text()


def test_unigram_baseline_is_the_smoothed_cross_entropy(tiny_models: dict[str, str]) -> None:
    import math

    from fl_lm.loading import load_tokenizer
    from fl_sim.baselines import _labels, loss_baselines
    from shared.datasets import Example

    tok = load_tokenizer(tiny_models["student"])
    train = [Example("Say it.", "", "yes yes yes no")] * 5
    held = {"a": [Example("Say it.", "", "yes no")], "b": [Example("Again.", "", "maybe")]}
    b = loss_baselines(tok, train, held)
    assert b["uniform"] == math.log(len(tok))
    counts: dict[int, int] = {}
    for ex in train:
        for t in _labels(tok, ex):
            counts[t] = counts.get(t, 0) + 1
    tot, v = sum(counts.values()), len(tok)
    per = [sum(-math.log((counts.get(t, 0) + 1) / (tot + v)) for t in _labels(tok, exs[0])) / len(_labels(tok, exs[0]))
           for exs in held.values()]
    assert abs(b["unigram"] - sum(per) / 2) < 1e-12
    assert b["unigram"] < b["uniform"]  # frequent tokens are cheaper than uniform
    assert per[0] < per[1]  # seen tokens cost less than unseen ones


def test_the_report_shows_answers_before_and_after(tmp_path: Path) -> None:
    sample = {"family": "arith", "prompt": "### Instruction:\nAdd.\n### Input:\n2 3\n### Response:\n", "reference": "5"}
    devs = ["device-0"]
    for r in (RoundRecord(round=0, status="baseline", mode="fedit", student=_evals(3.0), samples=[{**sample, "answer": "the the the"}]),
              RoundRecord(round=1, status="ok", mode="fedit", student=_evals(2.0), participants=devs, received=devs,
                          samples=[{**sample, "answer": "5 | 6"}])):
        append(tmp_path / "metrics.jsonl", r)
    assert read(tmp_path / "metrics.jsonl")[1].samples[0]["answer"] == "5 | 6"
    text = write_report(tmp_path, {}).read_text()
    assert "| arith | ### Instruction: Add. ### Input: 2 3 ### Response: | 5 | the the the | 5 \\| 6 |" in text


def test_the_report_lists_releases(tmp_path: Path) -> None:
    devs = ["device-0"]
    parity = {"max_logit_diff": 4.8e-7, "greedy_identical": 7, "prompts": 7, "token_agreement": 1.0,
              "loss_torch": 2.5, "loss_onnx": 2.5}
    for r in (RoundRecord(round=0, status="baseline", mode="fedit", student=_evals(3.0)),
              RoundRecord(round=1, status="ok", mode="fedit", student=_evals(2.0), participants=devs, received=devs,
                          release={"published": False, "reason": "parity gate failed"}),
              RoundRecord(round=2, status="ok", mode="fedit", student=_evals(2.0), participants=devs, received=devs,
                          release={"published": True, "release_id": "r0002-fedit", "bytes": 1_800_000, "quantization": "none",
                                   "parity": parity, "installed": ["device-0"], "refused": {}, "no_answer": ["device-1"]})):
        append(tmp_path / "metrics.jsonl", r)
    text = write_report(tmp_path, {}).read_text()
    assert "| 2 | r0002-fedit | 1.80 MB | none | 4.8e-07 | 7/7 | 1.000 | 2.5000 / 2.5000 | 1 of 2 devices |" in text
    assert "| 1 | not published: parity gate failed |" in text
