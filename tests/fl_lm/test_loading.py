"""Model sources are checked before anything starts, with one line naming what is wrong (issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_lm.loading import check_model_source
from shared.errors import ConfigError


def test_a_saved_model_passes(tiny_models: dict[str, str]) -> None:
    check_model_source(tiny_models["student"])
    check_model_source(tiny_models["teacher"])


def test_wrong_sources_are_one_line_errors(tiny_models: dict[str, str], tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    nocfg = tmp_path / "weights-only"
    nocfg.mkdir()
    (nocfg / "model.safetensors").write_bytes(b"")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (broken / name).write_bytes(b"{}")
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    cases = [
        (str(tmp_path / "nope"), "no such directory"),
        ("./models/typo", "no such directory"),
        (str(tok), "a tokenizer directory"),
        (str(nocfg), "not a model directory"),
        (str(tok / "tokenizer.json"), "is a file"),
        (str(broken), "cannot load its config"),
    ]
    for src, match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            check_model_source(src, "--student")
        msg = str(e.value)
        assert msg.startswith(f"--student {src}") and "\n" not in msg and len(msg) < 400, msg


def test_a_saved_adapter_loads_from_any_directory(tiny_models: dict[str, str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14: the base was recorded as the relative path it was loaded by, so
    AutoPeftModelForCausalLM failed from anywhere else."""
    import json

    from peft import AutoPeftModelForCausalLM

    from fl_lm.loading import load_model
    from fl_lm.lora import attach_lora, save
    from shared.messages import LoraSpec

    student = Path(tiny_models["student"])
    monkeypatch.chdir(student.parent)
    peft = attach_lora(load_model(student.name), LoraSpec(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj")))
    save(peft, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(student.resolve())
    monkeypatch.chdir(tmp_path)
    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
