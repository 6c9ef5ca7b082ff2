"""The memory planner and the device profiles (issue 13)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest

from edge_client import environment, planner
from shared.messages import LoraSpec
from shared.profiles import PROFILE_DIR, DeviceProfile, list_profiles, load_profile

ROOT = Path(__file__).resolve().parents[2]
ALL_LINEAR = LoraSpec(r=16, alpha=32.0, dropout=0.0,
                      target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def test_the_shape_comes_from_the_config_and_matches_the_loaded_model(tiny_models: dict[str, str]) -> None:
    from fl_lm.loading import load_model, param_count
    from fl_lm.lora import attach_lora, get_adapter

    shape = planner.shape_of(tiny_models["student"])
    model = load_model(tiny_models["student"])
    assert shape.params == param_count(model)
    lora = sum(v.size for v in get_adapter(attach_lora(model, ALL_LINEAR)).values())
    assert shape.lora_params(ALL_LINEAR) == lora


def test_the_plan_is_the_largest_setting_within_the_budget(tiny_models: dict[str, str]) -> None:
    shape = planner.shape_of(tiny_models["student"])
    big = load_profile("agx-orin-64gb")
    p = planner.plan(big, shape, ALL_LINEAR)
    assert (p.setting.batch, p.setting.seq, p.setting.checkpointing) == (big.batch_size, big.max_seq_len, False)
    assert p.predicted["peak"] <= p.budget
    # A budget just under the full setting's peak: a smaller one is chosen, and it fits.
    full = planner.predict(shape, p.setting, ALL_LINEAR, cuda=True)["peak"]
    tight = dataclasses.replace(big, memory_gb=(full - 1) / big.memory_fraction / (1 << 30))
    q = planner.plan(tight, shape, ALL_LINEAR)
    assert q.setting.batch * q.setting.seq < p.setting.batch * p.setting.seq or q.setting.checkpointing
    assert q.predicted["peak"] <= q.budget < full


def test_fewer_bits_and_checkpointing_predict_less() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    import torch

    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    with torch.device("meta"):
        shape = planner.shape_of_model(Qwen2ForCausalLM(cfg), cfg)
    assert 490e6 < shape.params < 500e6  # Qwen2.5-0.5B
    w = {b: planner.predict(shape, planner.Setting(2, 512, b, False), ALL_LINEAR, cuda=True)["weights"] for b in (16, 8, 4)}
    # Only the linear layers shrink (embeddings and norms stay at the load dtype): 2 B -> 1 B / 0.5 B, plus scales.
    assert w[16] - w[8] == pytest.approx(shape.linear_params * (2 - 1 - 4 / 64), rel=1e-6)
    assert w[8] - w[4] == pytest.approx(shape.linear_params * 0.5, rel=1e-6)
    a = [planner.predict(shape, planner.Setting(2, 512, 4, c), ALL_LINEAR, cuda=True)["activations"] for c in (False, True)]
    assert a[1] < a[0] / 5


def test_an_over_budget_base_is_refused_before_any_allocation(tiny_models: dict[str, str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import fl_lm.loading
    import fl_lm.quantized
    from edge_client.client import EdgeClient
    from edge_client.config import EdgeConfig

    small = (PROFILE_DIR / "cpu-dev.toml").read_text().replace("memory_gb = 8.0", "memory_gb = 0.5")
    (tmp_path / "small.toml").write_text(small.replace('name = "cpu-dev"', 'name = "small"'))
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")

    def allocated(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded although the plan refused it")

    monkeypatch.setattr(fl_lm.loading, "load_model", allocated)
    monkeypatch.setattr(fl_lm.quantized, "load_quantized", allocated)
    c = EdgeClient(EdgeConfig(device_id="d0", broker="mqtt://127.0.0.1:1", data=str(tmp_path / "d.jsonl"),
                              student=tiny_models["student"], profile=str(tmp_path / "small.toml"),
                              work_dir=str(tmp_path / "w"), insecure=True))
    with pytest.raises(planner.PlanError, match=r"does not fit profile small: .* of the 0\.25 GB budget \(runtime"):
        c.load_model()


def test_a_round_the_plan_cannot_fit_is_declined(tiny_models: dict[str, str]) -> None:
    shape = planner.shape_of(tiny_models["student"])
    prof = dataclasses.replace(load_profile("cpu-dev"), memory_gb=1.1)  # 0.55 GB: the runtime and a little more
    with pytest.raises(planner.PlanError, match="does not fit profile cpu-dev"):
        planner.plan(prof, shape, dataclasses.replace(ALL_LINEAR, r=1024))


def test_every_profile_loads_and_every_field_is_read_somewhere() -> None:
    names = list_profiles()
    assert {"cpu-dev", "orin-nano-8gb", "orin-nano-8gb-super", "orin-nx-8gb", "orin-nx-16gb", "agx-orin-32gb",
            "agx-orin-64gb", "xavier-nx"} <= set(names)
    readme = (PROFILE_DIR / "README.md").read_text()
    for n in names:
        p = load_profile(n)
        assert p.name == n and f"`{n}`" in readme, n  # each profile has its sources in the README
    code = "".join(f.read_text() for d in ("edge_client", "fl_lm") for f in (ROOT / d).rglob("*.py"))
    via = {"memory_gb": "budget_bytes", "memory_fraction": "budget_bytes"}  # the planner's budget (DeviceProfile.budget_bytes)
    for f in dataclasses.fields(DeviceProfile):
        if f.name in ("name", "description"):
            continue
        assert re.search(rf"profile\.{via.get(f.name, f.name)}\b", code), f"profile field {f.name} is never read"
        assert f"`{f.name}`" in readme, f"{f.name} has no source in firmware_profiles/README.md"


def test_environment_mismatches_are_named() -> None:
    nano = load_profile("orin-nano-8gb-super")
    assert environment.check(nano, gpu=("8.7", "12.6"), jetpack="6", power="25W") == []
    w = environment.check(nano, gpu=None, jetpack="5", power="MAXN_SUPER")
    assert any("JetPack 5.x" in x for x in w) and any("power mode 25W" in x for x in w)
    # A missing GPU is the device policy's one line (fl_lm.device, tests/fl_lm/test_device.py), not said twice.
    assert not any("GPU" in x for x in w)
    assert any("CUDA 12.6" in x for x in environment.check(nano, gpu=("8.7", "11.4"), jetpack=None, power=None))
    assert any("pick the profile" in x for x in environment.check(load_profile("cpu-dev"), gpu=("8.7", "12.6")))


def test_fl_edge_plan_prints_the_plan(tiny_models: dict[str, str], capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    from edge_client import cli

    with caplog.at_level(logging.INFO):
        assert cli.main(["plan", "--profile", "orin-nano-8gb-super", "--model", tiny_models["student"], "--rank", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["bits"] == 4 and out["lora_rank"] == 8 and out["predicted_bytes"]["peak"] <= out["budget_bytes"]
    assert "predicted peak" in caplog.text
    caplog.clear()
    assert cli.main(["plan", "--profile", "orin-nano-8gb-super", "--model", tiny_models["student"], "--rank", "64"]) == 2
    assert "allows at most 16" in caplog.text


def test_fl_edge_run_takes_profile_and_data_on_the_command_line(tiny_models: dict[str, str], tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    from edge_client import cli

    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    cfg = tmp_path / "dev.json"
    cfg.write_text(json.dumps({"device_id": "d0", "broker": "mqtt://127.0.0.1:1", "data": str(tmp_path / "d.jsonl"),
                               "student": tiny_models["student"], "work_dir": str(tmp_path / "w"), "insecure": True}))
    with caplog.at_level(logging.ERROR):
        assert cli.main(["run", "--config", str(cfg), "--profile", "toaster"]) == 2
    assert "device profile 'toaster' not found; known profiles" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert cli.main(["run", "--config", str(cfg), "--profile", "cpu-dev", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in caplog.text and len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


@pytest.mark.parametrize(("layers", "params"), [(10, 63_713_088), (30, 134_515_008)])
def test_cpu_dev_can_train_the_real_pair_by_the_plan_alone(layers: int, params: int, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """SmolLM2-135M's shape and its 10-layer copy on cpu-dev: no parameter cap, the plan decides
    (a config-only directory: the planner builds the model on the meta device)."""
    from transformers import LlamaConfig

    from edge_client import cli

    d = tmp_path / f"smol-{layers}"
    LlamaConfig(hidden_size=576, num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                vocab_size=49152, tie_word_embeddings=True).save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer.json").write_text("{}")
    assert cli.main(["plan", "--profile", "cpu-dev", "--model", str(d), "--rank", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == params and out["fits"] and (out["device"], out["compute_dtype"]) == ("cpu", "float32")
    assert out["batch"] * out["seq"] <= 8 * 128 and out["predicted_bytes"]["peak"] <= out["budget_bytes"]


def test_fl_edge_run_refuses_a_student_its_profile_cannot_train_in_one_line(tiny_models: dict[str, str], tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    from edge_client import cli

    small = (PROFILE_DIR / "cpu-dev.toml").read_text().replace("memory_gb = 8.0", "memory_gb = 0.5")
    (tmp_path / "small.toml").write_text(small.replace('name = "cpu-dev"', 'name = "small"'))
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    cfg = tmp_path / "dev.json"
    cfg.write_text(json.dumps({"device_id": "d0", "broker": "mqtt://127.0.0.1:1", "data": str(tmp_path / "d.jsonl"),
                               "student": tiny_models["student"], "work_dir": str(tmp_path / "w"), "insecure": True}))
    with caplog.at_level(logging.ERROR):
        assert cli.main(["run", "--config", str(cfg), "--profile", str(tmp_path / "small.toml")]) == 2  # before connecting
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and not errors[0].exc_info and "\n" not in errors[0].getMessage()
    assert errors[0].getMessage().startswith("does not fit profile small: even batch 1 x seq 32 needs")
