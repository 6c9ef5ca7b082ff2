"""``fl-sim`` fails early and loudly (issue 21): a student no device profile can train is refused in
one line before anything starts, and a run in which no round completed exits non-zero."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_sim import cli
from fl_sim import run as sim


def _config_only(d: Path, **shape: int) -> str:
    """A model directory with a config and placeholder files: enough for the checks and the
    planner, which builds the model on the meta device and never reads a weight."""
    from transformers import LlamaConfig

    d.mkdir(parents=True)
    LlamaConfig(**shape).save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer.json").write_text("{}")
    return str(d)


def test_a_student_no_profile_can_train_is_refused_in_one_line_before_anything_starts(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A 7B Llama: 27 GB of float32 weights against cpu-dev's 4 GB.
    big = _config_only(tmp_path / "llama-7b", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       intermediate_size=11008, vocab_size=32000)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        rc = cli.main(["--student", big, "--out", str(out), "--devices", "2", "--rounds", "1", "--mode", "fedit"])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert rc == 2
    assert len(errors) == 1 and "\n" not in errors[0].getMessage() and not errors[0].exc_info
    msg = errors[0].getMessage()
    assert msg.startswith(f"--student {big} (6,738.4M params, LoRA r 16) cannot be trained: does not fit profile cpu-dev: "), msg
    assert "of the 4.00 GB budget" in msg and "weights" in msg
    assert not out.exists()  # nothing prepared, nothing started


def test_the_real_pair_fits_the_simulated_devices(tmp_path: Path) -> None:
    # SmolLM2-135M's shape and its 10-layer copy: the planner, not a parameter cap, decides.
    smol = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                tie_word_embeddings=True)
    for layers in (30, 10):
        sim.check_trainable(_config_only(tmp_path / f"smol-{layers}", num_hidden_layers=layers, **smol), sim.SimSettings(),
                            "--student")


@pytest.mark.parametrize(("statuses", "reasons", "want"), [
    (["baseline", "ok"], [None, None], ""),
    (["baseline", "abandoned", "ok"], [None, "quorum not reached", None], ""),
    (["baseline", "abandoned", "abandoned"], [None, "quorum not reached: 0 of 2 updates", "quorum not reached: 0 of 2 updates"],
     "no round completed: all 2 were abandoned (quorum not reached: 0 of 2 updates)"),
    (["baseline"], [None], "no round completed: the aggregator recorded none"),
    ([], [], "no round completed: the aggregator recorded none"),
])
def test_a_run_fails_when_no_round_completed(statuses: list[str], reasons: list[str | None], want: str) -> None:
    recs = [{"round": i, "status": s, "abandon_reason": r} for i, (s, r) in enumerate(zip(statuses, reasons))]
    assert sim.no_round_completed(recs) == want


def _record(rnd: int, status: str, reason: str | None = None) -> str:
    from aggregator.model import EvalSummary, FamilyEval
    from aggregator.record import ModelEvals, RoundRecord

    ev = ModelEvals(EvalSummary({"add": FamilyEval(4, 2.0, 0.0)}, 2.0, 0.0))
    return json.dumps(RoundRecord(round=rnd, status=status, mode="fedit", student=ev, abandon_reason=reason).to_json())


def test_fl_sim_exits_non_zero_when_every_round_was_abandoned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("\n".join([_record(0, "baseline"), _record(1, "abandoned", "quorum not reached"),
                                                  _record(2, "abandoned", "quorum not reached")]) + "\n")
    reported: list[Path] = []

    def report(out_dir: Path, settings: dict, baselines: object, data_notes: object = None) -> Path:
        reported.append(out_dir / "report.md")
        return reported[-1]

    monkeypatch.setattr(sim, "write_report", report)
    agg = subprocess.Popen([sys.executable, "-c", ""])  # an aggregator that has finished (exit 0)
    agg.wait()
    launched = sim.Launched(sim.SimSettings(rounds=2, out=str(out)), out, sim.Fleet(out), agg, "mqtt://127.0.0.1:1",
                            "student", None, ["device-0"], time.monotonic(), {})
    with pytest.raises(RuntimeError, match=r"^no round completed: all 2 were abandoned \(quorum not reached\); report "):
        sim.finish(launched)
    assert reported  # the report is still written, for the user to read why

    def abandoned_run(s: sim.SimSettings) -> Path:
        return sim.finish(launched)

    monkeypatch.setattr(cli, "simulate", abandoned_run)
    assert cli.main(["--out", str(out), "--devices", "2", "--rounds", "2"]) != 0


def test_the_run_stops_when_every_device_has_exited_with_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fleet = sim.Fleet(tmp_path)
    die = "import logging, sys; logging.basicConfig(); logging.getLogger('fl-edge').error('student x: no such directory'); sys.exit(2)"
    for d in ("device-0", "device-1"):
        fleet.start(d, ["-c", die])
    agg = fleet.start("aggregator", ["-c", "import time; time.sleep(60)"])  # waiting for devices that are gone
    t0 = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match=r"^every device exited before the run ended "
                                                                                 r"\(device-0: ERROR:fl-edge:student x: no such"):
            sim._follow(tmp_path / "metrics.jsonl", agg, 1, fleet)
    finally:
        fleet.stop_all(grace=0)
    assert time.monotonic() - t0 < 30
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["device-0 exited with code 2", "device-1 exited with code 2"]
