"""Quantized-base LoRA (issue 13): HQQ 4- and 8-bit frozen base, fp32 adapters in PEFT's format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fl_lm.evaluate import evaluate
from fl_lm.loading import load_model, load_tokenizer
from fl_lm.lora import attach_lora, get_adapter, save
from fl_lm.quantized import enable_checkpointing, quantize_base
from fl_lm.train import train_lora
from shared.datasets import Example
from shared.messages import LoraSpec

SPEC = LoraSpec(r=8, alpha=16.0, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
TRAIN = [Example("Add one.", str(i), str(i + 1), "arith") for i in range(0, 80, 2)]
HELD = [Example("Add one.", str(i), str(i + 1), "arith") for i in range(1, 40, 4)]


def _loss(model, tok) -> float:  # type: ignore[no-untyped-def]
    return next(iter(evaluate(model, tok, HELD, 64, 16).values())).loss


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_lora_trains_saves_and_merges_into_the_fp_base(bits: int, tiny_models: dict[str, str], tmp_path: Path) -> None:
    from peft import PeftModel

    base_id = tiny_models["student"]
    tok = load_tokenizer(base_id)
    fp_keys = sorted(get_adapter(attach_lora(load_model(base_id), SPEC)))

    model = load_model(base_id)
    assert quantize_base(model, bits) > 0
    enable_checkpointing(model)
    peft = attach_lora(model, SPEC)
    assert sorted(get_adapter(peft)) == fp_keys  # the update's names: the aggregator cannot tell the difference
    before = _loss(peft, tok)
    train_lora(peft, tok, TRAIN, steps=30, lr=5e-3, batch_size=8, max_len=64, seed=0)
    after = _loss(peft, tok)
    assert after < before - 0.1, (before, after)

    save(peft, tmp_path / "adapter")
    ids = tok(["Add one. 7", "Add one. 12"], return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        lq = peft(input_ids=ids).logits  # quantized base + adapter
        lq0 = quantize_and_run(base_id, bits, ids)  # quantized base alone
        fp = load_model(base_id)
        l0 = fp(input_ids=ids).logits  # fp base alone
        merged = PeftModel.from_pretrained(fp, str(tmp_path / "adapter")).merge_and_unload()
        lm = merged(input_ids=ids).logits  # the adapter merged into the fp base, as the aggregator does
    quant_err = float((l0 - lq0).abs().max())
    merge_gap = float((lm - lq).abs().max())
    adapter_effect = float((lq - lq0).abs().max())
    # Within the quantization error of the base, and far from "the adapter was lost".
    assert merge_gap <= 1.5 * quant_err + 1e-4, (merge_gap, quant_err)
    assert merge_gap < 0.25 * adapter_effect, (merge_gap, adapter_effect)


def quantize_and_run(base_id: str, bits: int, ids: torch.Tensor) -> torch.Tensor:
    m = load_model(base_id)
    quantize_base(m, bits)
    return m(input_ids=ids).logits


def test_unsupported_bits_are_refused(tiny_models: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_base(load_model(tiny_models["student"]), 3)


def test_a_device_with_a_4_bit_profile_trains_over_the_quantized_base(tiny_models: dict[str, str], tmp_path: Path) -> None:
    """The edge client loads its base quantized when its profile says ``quant_bits = 4``, proves
    the same base digest as the aggregator's fp copy, and its update has the fp adapter's names."""
    import dataclasses
    import json

    import numpy as np
    from hqq.core.quantize import HQQLinear

    from aggregator.model import HostedModel
    from edge_client.client import EdgeClient
    from edge_client.config import EdgeConfig
    from shared import tensors
    from shared.profiles import PROFILE_DIR
    from tests.specs import dense_spec

    prof = (PROFILE_DIR / "cpu-dev.toml").read_text().replace("quant_bits = 16", "quant_bits = 4")
    (tmp_path / "q4.toml").write_text(prof.replace('name = "cpu-dev"', 'name = "cpu-q4"'))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"instruction": e.instruction, "input": e.input, "output": e.output}) + "\n"
                                              for e in TRAIN))
    c = EdgeClient(EdgeConfig(device_id="d0", broker="mqtt://127.0.0.1:1", data=str(tmp_path / "d.jsonl"),
                              student=tiny_models["student"], profile=str(tmp_path / "q4.toml"), work_dir=str(tmp_path / "w"),
                              insecure=True))
    c.load_model()
    assert any(isinstance(m, HQQLinear) for m in c._model.modules())
    agg = HostedModel("student", tiny_models["student"], SPEC, seed=0, max_seq_len=64, eval_batch_size=8)
    assert c.digest == agg.digest  # file digest on both sides: the quantized device has the same base
    spec = dataclasses.replace(dense_spec(1, ["d0"], 1, digest=agg.digest), lora=SPEC, local_steps=5,
                               adapter=tensors.pack(agg.state))
    delta, res = c.train_delta(spec)
    assert sorted(delta) == sorted(agg.state) and all(np.isfinite(v).all() for v in delta.values())
    assert res.steps == 5 and any(np.abs(v).max() > 0 for v in delta.values())


@pytest.mark.parametrize("bits", [4, 8])
def test_the_streaming_load_gives_the_model_quantized_after_a_full_load(bits: int, tiny_models: dict[str, str]) -> None:
    """load_quantized reads and quantizes layer by layer (no fp copy of the whole base), and must
    give exactly what quantizing a fully loaded fp model gives, tied LM head included."""
    from hqq.core.quantize import HQQLinear

    from fl_lm.quantized import load_quantized

    base_id = tiny_models["student"]
    tok = load_tokenizer(base_id)
    ids = tok(["Add one. 7", "Add one. 12"], return_tensors="pt", padding=True)["input_ids"]
    streamed = load_quantized(base_id, bits)
    assert not any(p.device.type == "meta" for p in streamed.parameters())
    assert sum(isinstance(m, HQQLinear) for m in streamed.modules()) > 0
    if streamed.config.tie_word_embeddings:
        assert streamed.get_output_embeddings().weight is streamed.get_input_embeddings().weight
    with torch.no_grad():
        got = streamed(input_ids=ids).logits
        want = quantize_and_run(base_id, bits, ids)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_return_freed_memory_fixes_the_threshold_on_glibc() -> None:
    import platform

    from fl_lm.memory import return_freed_memory

    assert return_freed_memory() is (platform.libc_ver()[0] == "glibc")
