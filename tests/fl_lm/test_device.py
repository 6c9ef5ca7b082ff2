"""The device policy (issue 21): where each model runs and at which dtype, from the config, the
profile and what torch sees; CUDA is faked on the CPU, and the ``gpu`` tests run it for real."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_lm import device
from shared.datasets import Example
from shared.errors import ConfigError
from shared.messages import LoraSpec

LORA = LoraSpec(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj", "up_proj"))
EXAMPLES = [Example(f"Add {a} and {b}.", "", str(a + b)) for a in range(5) for b in range(3)]
needs_cuda = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Any:
    device._warned.clear()  # each test sees the policy's warnings as a new process would
    yield
    device._warned.clear()


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, *, gpus: int, bf16: bool = True) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)


@pytest.mark.parametrize(("gpus", "bf16", "dev", "dtype", "want_device", "want_amp"), [
    (0, False, "auto", "auto", "cpu", None),  # no GPU: float32 on the CPU
    (1, True, "auto", "auto", "cuda:0", "bfloat16"),  # Ampere and later (Orin): bf16
    (1, False, "auto", "auto", "cuda:0", "float16"),  # Volta (Xavier): fp16
    (1, True, "cpu", "auto", "cpu", None),  # asked for the CPU: the GPU is left alone
    (2, True, "cuda:1", "auto", "cuda:1", "bfloat16"),
    (1, True, "cuda", "float32", "cuda:0", None),  # no autocast
    (1, True, "auto", "float16", "cuda:0", "float16"),
    (0, False, "cpu", "bfloat16", "cpu", "bfloat16"),  # an explicit CPU autocast is honoured
])
def test_the_policy_picks_what_the_config_and_the_hardware_say(monkeypatch: pytest.MonkeyPatch, gpus: int, bf16: bool,
                                                               dev: str, dtype: str, want_device: str, want_amp: str | None) -> None:
    _fake_cuda(monkeypatch, gpus=gpus, bf16=bf16)
    pl = device.resolve(dev, dtype)
    assert (pl.device, pl.autocast_dtype) == (want_device, want_amp), pl.reason
    assert pl.compute_bytes == (2 if want_amp else 4)
    assert pl.reason.startswith(f"device = {dev}")


@pytest.mark.parametrize(("gpus", "bf16", "dev", "dtype", "match"), [
    (0, False, "cuda", "auto", r"device = cuda: torch sees no CUDA GPU .*set device = \"auto\" or \"cpu\""),
    (0, False, "cuda:0", "auto", "torch sees no CUDA GPU"),
    (1, True, "cuda:2", "auto", r"device = cuda:2: torch sees 1 CUDA GPU \(cuda:0\)"),
    (1, False, "cuda", "bfloat16", "dtype = bfloat16: this GPU has no native bf16"),
    (1, True, "gpu", "auto", "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (1, True, "auto", "fp8", "dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"),
])
def test_what_cannot_be_had_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch, gpus: int, bf16: bool, dev: str,
                                                   dtype: str, match: str) -> None:
    _fake_cuda(monkeypatch, gpus=gpus, bf16=bf16)
    with pytest.raises(ConfigError, match=match) as e:
        device.resolve(dev, dtype)
    assert "\n" not in str(e.value)


def test_a_gpu_expected_and_absent_warns_once_then_runs_on_the_cpu(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    _fake_cuda(monkeypatch, gpus=0)
    with caplog.at_level(logging.WARNING):
        assert device.resolve("auto").device == "cpu"  # nobody expects a GPU: nothing to say
        assert not caplog.records
        for _ in range(3):
            pl = device.resolve("auto", expect_gpu="profile orin-nano-8gb (sm_87)")
            assert (pl.device, pl.autocast_dtype) == ("cpu", None)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("profile orin-nano-8gb (sm_87) expects a CUDA GPU but torch sees none")
    assert "running on the CPU" in lines[0]


def test_configs_validate_device_and_dtype() -> None:
    from aggregator.config import AggregatorConfig
    from edge_client.config import EdgeConfig

    edge = dict(device_id="d0", broker="mqtt://127.0.0.1:1", data="x.jsonl", student="s", insecure=True)
    assert EdgeConfig(**edge).device == "auto" and EdgeConfig(**edge).dtype == "auto"  # type: ignore[arg-type]
    assert EdgeConfig(**edge, device="cuda:1", dtype="float16").device == "cuda:1"  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="device must be"):
        EdgeConfig(**edge, device="gpu0")  # type: ignore[arg-type]
    agg = dict(broker="mqtt://127.0.0.1:1", student="s", eval_data="e", out_dir="o", devices=("d0",), insecure=True,
               mode="fedit")
    assert AggregatorConfig(**agg).device == "auto"  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="dtype must be one of"):
        AggregatorConfig(**agg, dtype="half")  # type: ignore[arg-type]


def test_expected_placement_of_a_profile_needs_no_torch_and_matches_the_hardware() -> None:
    assert device.expected("") == device.Placement("cpu", None, "profile without a CUDA GPU")
    assert device.expected("8.7").autocast_dtype == "bfloat16"  # Orin
    assert device.expected("7.2").autocast_dtype == "float16"  # Xavier
    assert device.expected("8.7", "float32").compute_bytes == 4


def test_planner_counts_the_dtype_the_policy_uses(tiny_models: dict[str, str]) -> None:
    from edge_client import planner
    from shared.profiles import load_profile

    shape = planner.shape_of(tiny_models["student"])
    orin, xavier, cpu = load_profile("orin-nano-8gb-super"), load_profile("xavier-nx"), load_profile("cpu-dev")
    lora = dataclasses.replace(LORA, r=8)
    p = planner.plan(orin, shape, lora)
    assert (p.to_json()["device"], p.to_json()["compute_dtype"]) == ("cuda:0", "bfloat16")
    assert p.predicted == planner.predict(shape, p.setting, lora, cuda=True, compute_bytes=2)
    assert planner.plan(xavier, shape, lora).to_json()["compute_dtype"] == "float16"
    c = planner.plan(cpu, shape, lora)
    assert (c.to_json()["device"], c.to_json()["compute_dtype"]) == ("cpu", "float32")
    assert c.predicted == planner.predict(shape, c.setting, lora, cuda=False, compute_bytes=4)
    # The placement the device resolved wins over the profile's: the same setting in float32 on
    # the GPU holds twice the activation bytes, and a CPU run has no CUDA context.
    s = p.setting
    bf16 = planner.predict(shape, s, lora, cuda=True, compute_bytes=2)
    fp32 = planner.predict(shape, s, lora, cuda=True, compute_bytes=4)
    assert fp32["activations"] == pytest.approx(2 * bf16["activations"], rel=1e-6)
    on_cpu = planner.plan(orin, shape, lora, device.CPU)
    assert on_cpu.to_json()["compute_dtype"] == "float32"
    assert on_cpu.predicted["runtime"] == bf16["runtime"] - planner.CUDA_CONTEXT


def test_a_placed_model_carries_its_placement_through_peft(tiny_models: dict[str, str]) -> None:
    from fl_lm.loading import load_model
    from fl_lm.lora import attach_lora

    base = load_model(tiny_models["student"])
    assert device.of_model(base) == device.CPU  # placed by nobody: its parameters' device, float32
    pl = device.Placement("cpu", "bfloat16", "test")
    peft = attach_lora(device.place(base, pl), LORA)
    assert device.of_model(peft) == pl  # found on the base model under the PEFT wrappers
    assert all(p.dtype.is_floating_point and str(p.dtype) == "torch.float32" for p in peft.parameters() if p.requires_grad)


def test_the_quantized_loader_follows_the_policy(tiny_models: dict[str, str]) -> None:
    import torch

    from fl_lm.quantized import load_quantized

    pl = device.resolve("cpu")
    model = load_quantized(tiny_models["student"], 8, placement=pl)
    assert device.of_model(model) == pl
    q = [m for m in model.modules() if type(m).__name__ == "HQQLinear"]
    assert q and all(m.compute_dtype == torch.float32 for m in q)  # float32 on the CPU, as the planner counts


def _gpu_profile(tmp_path: Path, quant_bits: int = 16) -> Path:
    from shared.profiles import PROFILE_DIR

    src = (PROFILE_DIR / "cpu-dev.toml").read_text()
    src = src.replace('compute_capability = ""', 'compute_capability = "8.7"').replace('cuda = ""', 'cuda = "12.6"')
    src = src.replace('name = "cpu-dev"', 'name = "gpu-box"').replace("quant_bits = 16", f"quant_bits = {quant_bits}")
    (tmp_path / "gpu-box.toml").write_text(src)
    return tmp_path / "gpu-box.toml"


def _client(tmp_path: Path, student: str, profile: Path, **cfg: Any) -> Any:
    from edge_client.client import EdgeClient
    from edge_client.config import EdgeConfig

    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    return EdgeClient(EdgeConfig(device_id="d0", broker="mqtt://127.0.0.1:1", data=str(tmp_path / "d.jsonl"), student=student,
                                 profile=str(profile), work_dir=str(tmp_path / "w"), insecure=True, **cfg))


def test_a_device_whose_gpu_is_missing_says_so_once_and_trains_on_the_cpu(
        tiny_models: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _fake_cuda(monkeypatch, gpus=0)
    c = _client(tmp_path, tiny_models["student"], _gpu_profile(tmp_path))
    with caplog.at_level(logging.WARNING):
        c.load_model()
    gpu_lines = [r.getMessage() for r in caplog.records if "GPU" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(gpu_lines) == 1, gpu_lines
    assert gpu_lines[0].startswith("d0: profile gpu-box (sm_87) expects a CUDA GPU but torch sees none")
    assert (c.placement.device, c.placement.autocast_dtype) == ("cpu", None)
    assert {str(p.dtype) for p in c._model.parameters()} == {"torch.float32"}


def test_a_device_asked_for_cuda_without_one_refuses_before_loading(
        tiny_models: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fl_lm.loading

    _fake_cuda(monkeypatch, gpus=0)

    def allocated(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded although its device is missing")

    monkeypatch.setattr(fl_lm.loading, "load_model", allocated)
    c = _client(tmp_path, tiny_models["student"], _gpu_profile(tmp_path), device="cuda")
    with pytest.raises(ConfigError, match="device = cuda: torch sees no CUDA GPU"):
        c.load_model()


def test_fl_edge_run_with_an_absent_cuda_is_one_line(tiny_models: dict[str, str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from edge_client import cli

    _fake_cuda(monkeypatch, gpus=0)
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    cfg = tmp_path / "dev.json"
    cfg.write_text(json.dumps({"device_id": "d0", "broker": "mqtt://127.0.0.1:1", "data": str(tmp_path / "d.jsonl"),
                               "student": tiny_models["student"], "work_dir": str(tmp_path / "w"), "insecure": True,
                               "device": "cuda"}))
    with caplog.at_level(logging.ERROR):
        assert cli.main(["run", "--config", str(cfg)]) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "torch sees no CUDA GPU" in errors[0].getMessage() and not errors[0].exc_info


def test_sampling_with_a_host_generator_is_the_same_draw_wherever_the_logits_are() -> None:
    import torch

    from fl_lm.minillm import mixed_sample

    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    a = mixed_sample(s, t, 0.3, torch.Generator().manual_seed(4))
    b = mixed_sample(s, t, 0.3, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1])


# -- loops under a placement: on the CPU (float32 and bf16 autocast) and, where there is one, on CUDA --

WHERE = [pytest.param(("cpu", "float32"), id="cpu-fp32"), pytest.param(("cpu", "bfloat16"), id="cpu-bf16"),
         pytest.param(("cuda", "auto"), id="cuda", marks=[pytest.mark.gpu, needs_cuda])]


@pytest.mark.parametrize("where", WHERE)
def test_a_lora_training_step_runs_where_the_policy_puts_it(tiny_models: dict[str, str], where: tuple[str, str]) -> None:
    import torch

    from fl_lm.loading import load_model, load_tokenizer
    from fl_lm.lora import attach_lora, get_adapter, set_adapter
    from fl_lm.train import train_lora

    pl = device.resolve(*where)
    assert pl.is_cuda == (where[0] == "cuda") and (pl.autocast_dtype is None) == (where[1] == "float32")
    peft = device.place(attach_lora(load_model(tiny_models["student"], dtype=pl.weights_dtype), LORA), pl)
    assert next(peft.parameters()).device.type == pl.device_type
    assert {p.dtype for p in peft.parameters() if p.requires_grad} == {torch.float32}  # fp32 master weights
    before = get_adapter(peft)  # read back to the host
    res = train_lora(peft, load_tokenizer(tiny_models["student"]), EXAMPLES, steps=3, lr=1e-2, batch_size=4, max_len=32, seed=0)
    after = get_adapter(peft)
    assert res.steps == 3 and np.isfinite(res.mean_loss)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in after.values())
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # the adapter learnt
    set_adapter(peft, before)  # host arrays go back onto the device
    assert all(np.array_equal(get_adapter(peft)[k], before[k]) for k in before)


@pytest.mark.parametrize("where", WHERE[1:])
def test_a_hosted_model_evaluates_under_autocast_as_in_float32(tiny_models: dict[str, str], where: tuple[str, str]) -> None:
    from aggregator.model import HostedModel

    examples = [dataclasses.replace(e, family="add") for e in EXAMPLES[:6]]
    amp = HostedModel("student", tiny_models["student"], LORA, seed=0, max_seq_len=48, eval_batch_size=4,
                      placement=device.resolve(*where))
    assert amp.placement.autocast_dtype is not None
    assert next(amp.peft.parameters()).device.type == amp.placement.device_type
    fp32 = HostedModel("student", tiny_models["student"], LORA, seed=0, max_seq_len=48, eval_batch_size=4,
                       placement=device.resolve("cpu", "float32"))
    assert amp.digest == fp32.digest  # the devices' digest, whatever the aggregator runs on
    a, f = amp.evaluate(examples), fp32.evaluate(examples)
    assert abs(a.mean_loss - f.mean_loss) < 0.05 * f.mean_loss  # bf16/fp16 autocast against float32
    assert len(amp.answers(examples[:2])) == 2


@pytest.mark.parametrize("where", WHERE[1:])
def test_distillation_and_minillm_run_under_the_placement(tiny_models: dict[str, str], where: tuple[str, str]) -> None:
    import torch

    from fl_lm import fleet_teacher as ft
    from fl_lm import minillm as ml
    from fl_lm.data import collate, encode_example
    from fl_lm.distil import Distiller, KDSettings
    from fl_lm.loading import load_model, load_tokenizer
    from fl_lm.lora import attach_lora

    pl = device.resolve(*where)
    tok = load_tokenizer(tiny_models["student"])
    student = device.place(attach_lora(load_model(tiny_models["student"]), LORA, seed=0), pl)
    teacher = device.place(attach_lora(load_model(tiny_models["teacher"]), LORA, seed=1), pl)
    stats = Distiller(tok, tok, EXAMPLES, max_len=32).run(student, teacher, KDSettings(steps=2, batch_size=4, top_k=8), seed=0)
    assert stats.steps == 2 and np.isfinite(stats.last_loss)
    prompts = torch.tensor([tok("Add 1 and 2.")["input_ids"]] * 2)  # built on the host, as the modes do
    lm = collate(tok, [encode_example(tok, e, 32) for e in EXAMPLES[:2]])
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    st = ml.minillm_step(student, teacher, opt, prompts, lm, ml.MiniLLMSettings(max_new_tokens=4, ppo_epochs=1),
                         tok.eos_token_id, torch.Generator().manual_seed(0))
    assert np.isfinite(st["loss"])
    roll = ml.generate_mixed(teacher, teacher, prompts, 4, 0.0, tok.eos_token_id, torch.Generator().manual_seed(1))
    assert roll.ids.device.type == pl.device_type
    cand = ft.candidates(ml.response_logits(teacher, roll.ids, prompts.size(1)), roll.ids[:, prompts.size(1):], 3)
    vec = ft.score_rollouts(student, roll.ids.cpu().numpy(), cand.cpu().numpy(), roll.mask.cpu().numpy(), prompts.size(1))
    assert vec.shape == (ft.vector_len(*cand.shape),) and np.all((vec >= 0) & (vec <= 1 + 1e-6))
