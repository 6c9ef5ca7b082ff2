"""``fl-sim --data`` and the real pair (issue 21): used where ``make models-real`` installed it, with
one log line and the real sizing (flags still win); otherwise one warning line that the built-in
models are sized for the synthetic tasks, naming the command that imports the real ones. Nothing
here loads a model: the directories hold a model card and a config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fl_lm.model_dir import CARD_FILE
from fl_sim import cli, real_pair
from fl_sim.run import SIM_LORA_TARGETS, SimSettings

SMOL = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
            tie_word_embeddings=True)


def _model_dir(d: Path, *, card: bool = True, layers: int = 10) -> Path:
    """What the selection and the planner read of a model: its card and its config."""
    from transformers import LlamaConfig

    d.mkdir(parents=True)
    LlamaConfig(num_hidden_layers=layers, **SMOL).save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer.json").write_text("{}")
    if card:
        (d / CARD_FILE).write_text(json.dumps({"schema": "fl-model-card/1"}))
    return d


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "real"
    _model_dir(root / "teacher", layers=30)
    _model_dir(root / "student")
    monkeypatch.setenv(real_pair.ENV, str(root))
    return root


@pytest.fixture
def data(tmp_path: Path) -> str:
    p = tmp_path / "alpaca.jsonl"
    p.write_text("".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": str(i)}) + "\n" for i in range(40)))
    return str(p)


def test_data_without_models_uses_the_installed_real_pair_sized_for_it(installed: Path, data: str, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fl_sim.real_pair"):
        s = cli.parse(["--data", data, "--out", str(tmp_path / "run"), "--local-steps", "3"])
    assert (s.student, s.teacher) == (str(installed / "student"), str(installed / "teacher"))
    lines = [r.getMessage() for r in caplog.records]
    assert sum("using the real pair installed in" in x for x in lines) == 1, lines
    assert all("\n" not in x for x in lines)
    for k, v in real_pair.REAL_SIZING.items():
        if k != "local_steps":
            assert getattr(s, k) == v, k
    assert s.local_steps == 3  # what the command line says wins
    assert s.lora_targets == real_pair.LINEAR_TARGETS and "embed_tokens" not in s.lora_targets


@pytest.mark.parametrize("argv", [
    [],  # no --data: the synthetic tasks and their toy pair, as `make demo` runs them
    ["--student", "STUDENT"],  # a student of the user's own: the pair is not swapped in behind it
])
def test_the_real_pair_is_not_taken_without_data_or_beside_a_given_model(installed: Path, data: str, tmp_path: Path,
                                                                         argv: list[str]) -> None:
    toy = _model_dir(tmp_path / "toy-student", card=False)
    argv = [str(toy) if a == "STUDENT" else a for a in argv] + (["--data", data] if argv else [])
    s = cli.parse([*argv, "--out", str(tmp_path / "run")])
    assert s.teacher is None and s.student == (str(toy) if "--student" in argv else None)
    assert s == SimSettings(**{**SimSettings().__dict__, "out": str(tmp_path / "run"), "data": s.data, "student": s.student})


def test_a_given_imported_student_is_sized_as_a_real_one(installed: Path, tmp_path: Path) -> None:
    s = cli.parse(["--student", str(installed / "student"), "--teacher", str(installed / "teacher"), "--rounds", "1",
                   "--profile", "cpu-dev", "--out", str(tmp_path / "run")])
    assert s.rounds == 1 and s.profile == "cpu-dev" and s.local_steps == real_pair.REAL_SIZING["local_steps"]


def test_not_installed_one_warning_names_the_command_and_the_toy_figures(tmp_path: Path, data: str,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    from fl_sim import models_cli

    monkeypatch.setenv(real_pair.ENV, str(tmp_path / "nothing-here"))

    def stop(*a: object, **k: object) -> dict[str, str]:
        raise RuntimeError("stopped before building the toy models")

    monkeypatch.setattr(models_cli, "build_default", stop)
    with caplog.at_level(logging.INFO):
        assert cli.main(["--data", data, "--out", str(tmp_path / "run"), "--devices", "2", "--rounds", "1"]) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    w = warnings[0]
    assert "\n" not in w and "`make models-real`" in w and "6.09" in w and "5.91" in w and "synthetic tasks" in w
    s = cli.parse(["--data", data, "--out", str(tmp_path / "run")])
    assert s.student is None and s.local_steps == SimSettings().local_steps and s.lora_targets == SIM_LORA_TARGETS


def test_a_half_installed_pair_is_not_installed(tmp_path: Path) -> None:
    _model_dir(tmp_path / "real" / "teacher", layers=30)
    _model_dir(tmp_path / "real" / "student", card=False)  # prune stopped before writing its card
    assert real_pair.find(tmp_path / "real") is None
    (tmp_path / "real" / "student" / CARD_FILE).write_text("{}")
    assert real_pair.find(tmp_path / "real") == real_pair.RealPair(tmp_path / "real" / "teacher", tmp_path / "real" / "student")


def test_the_real_sizing_fits_its_profile_at_4_x_256(installed: Path) -> None:
    """What the devices will plan for the real student: the whole batch x seq of cpu-dev-long,
    with the real pair's LoRA (all linear layers), in float32 on the CPU."""
    from edge_client import planner
    from fl_lm import device
    from shared.messages import LoraSpec
    from shared.profiles import load_profile

    s = real_pair.choose(SimSettings(student=str(installed / "student")), given=())
    prof = load_profile(s.profile)
    lora = LoraSpec(r=s.lora_r, alpha=2.0 * s.lora_r, dropout=0.0, target_modules=s.lora_targets)
    shape = planner.shape_of(str(installed / "student"))
    p = planner.plan(prof, shape, lora, device.CPU)
    assert (p.setting.batch, p.setting.seq) == (4, 256) == (prof.batch_size, prof.max_seq_len)
    assert s.max_seq_len == prof.max_seq_len  # the aggregator scores the lengths the devices train on
    assert shape.lora_params(lora) == 1_628_160  # 10 layers x 162,816: the update a device sends a round


ALPACA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca-4k.jsonl"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_short_secure_round_of_the_real_pair_then_a_device_answers_from_its_release(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Where `make models-real` installed the pair: one fedit round with secure aggregation on
    Alpaca, the signed ONNX release through its parity gate to every device, and `fl-edge
    generate` answering an instruction from a device's installed release."""
    from edge_client import cli as edge_cli
    from fl_sim.run import simulate

    pair = real_pair.find()
    if pair is None:
        pytest.skip(f"the real pair is not installed in {real_pair.location()} (`make models-real`)")
    if not ALPACA.exists():
        pytest.skip(f"no Alpaca data at {ALPACA} (a fresh clone has no ../shared)")
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(ALPACA.read_text().splitlines(keepends=True)[:200]))
    out = tmp_path / "run"
    given = {"rounds", "local_steps", "eval_per_family"}
    s = real_pair.choose(SimSettings(devices=3, rounds=1, out=str(out), data=str(data), mode="fedit", local_steps=2,
                                     eval_per_family=4), given=given)
    assert s.student == str(pair.student)
    simulate(s)
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()][-1]
    assert rec["status"] == "ok" and rec["secagg"] and len(rec["received"]) == 3, rec.get("abandon_reason")
    assert rec["release"]["published"], rec["release"]
    assert sorted(rec["release"]["installed"]) == ["device-0", "device-1", "device-2"]
    capsys.readouterr()
    assert edge_cli.main(["generate", "--instruction", "Name three primary colours.", "--config",
                          str(out / "config" / "device-0.json"), "--max-new-tokens", "24"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["release_id"] == rec["release"]["release_id"] and got["text"].strip()
