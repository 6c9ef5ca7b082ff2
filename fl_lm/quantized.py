"""A quantized frozen base under trainable LoRA adapters (issue 13): HQQ 4- and 8-bit weights.

Why HQQ (measured here, ../shared/docs/STACK.md): it is pure Python with no calibration data, so
it runs on this CPU and on a Jetson alike. It trains under PEFT's LoRA and merges correctly.
bitsandbytes' aarch64 wheels fail on Jetson without a source build. torchao's int8 has no
safetensors save and breaks merges when applied directly. optimum-quanto's merge silently loses
the LoRA delta.

Only the base is quantized. The adapters stay float32, and the update a device sends is the
delta of those fp adapters under PEFT's standard names, the same as over an unquantized base.
So the aggregator never needs the quantized base: it merges the adapters into its fp base
(tests/fl_lm/test_quantized.py checks that this gives the quantized model's logits within the
quantization error).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

BITS = (4, 8)  # 16: the base stays as loaded
GROUP_SIZE = 64
SKIP = ("lm_head",)  # tied to the input embedding in our students; HQQ quantizes Linear layers only


def quantize_base(model: Any, bits: int, group_size: int = GROUP_SIZE) -> int:
    """Replace the model's Linear layers (the LM head excepted) by HQQ ones, in place, freeing
    each fp weight as it goes; returns how many layers were quantized."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    if bits not in BITS:
        raise ValueError(f"quantized base: bits must be one of {BITS}, got {bits}")
    p = next(model.parameters())
    # float32 on CPU (bf16/fp16 matmuls are many times slower there); the loaded dtype on CUDA.
    compute = torch.float32 if p.device.type == "cpu" else p.dtype
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    n = 0
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name not in SKIP:
                q = HQQLinear(child, cfg, compute_dtype=compute, device=str(p.device), del_orig=True)
                setattr(parent, name, q)
                n += 1
    model.config.fl_quantized_base = {"method": "hqq", "bits": bits, "group_size": group_size}
    log.info("quantized %d linear layers of the frozen base to %d bits (HQQ, group %d)", n, bits, group_size)
    return n


def load_quantized(id_or_path: str, bits: int, group_size: int = GROUP_SIZE, placement: Any = None) -> Any:
    """The base, quantized as it loads, as the device loads it: layer by layer from the safetensors
    files, so the peak is the quantized model plus one float layer (benchmarks/edge_train.py).

    On the ``placement``'s device (``fl_lm.device``; by default ``resolve("auto")``), with HQQ's
    compute dtype and the unquantized layers at its ``weights_dtype``: bf16 or fp16 on a GPU,
    float32 on the CPU (bf16/fp16 matmuls are many times slower there), as the planner counts.

    Why not transformers' ``HqqConfig`` (the fallback below): it maps the whole file and keeps the
    mapping alive through the float embedding that aliases it, so every page read while
    quantizing stays resident. On the 0.5B shape its load peaked at 2.2-3.2 GB, above the 1.9 GB of
    fp32 weights that 4 bits were meant to save."""
    from fl_lm.device import place, resolve

    if bits not in BITS:
        raise ValueError(f"quantized base: bits must be one of {BITS}, got {bits}")
    pl = placement or resolve("auto")
    try:
        model = _stream_quantized(id_or_path, bits, group_size, pl.device, pl.weights_dtype)
    except _NotStreamable as e:
        log.warning("%s: %s; loading through transformers' HqqConfig instead (higher load peak)", id_or_path, e)
        model = _hqq_config_load(id_or_path, bits, group_size, pl.device, pl.weights_dtype)
    return place(model, pl)


class _NotStreamable(Exception):
    pass


def _weight_files(root: Any) -> dict[str, Any]:
    """Tensor name -> the safetensors file holding it (one file, or a sharded index)."""
    import json

    index = root / "model.safetensors.index.json"
    if index.exists():
        return {k: root / v for k, v in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()}
    single = root / "model.safetensors"
    if not single.exists():
        raise _NotStreamable("no safetensors weights in a local directory")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)


def _stream_quantized(id_or_path: str, bits: int, group_size: int, device: str, dtype_name: str) -> Any:
    from pathlib import Path

    import torch
    from accelerate import init_empty_weights
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(id_or_path)
    if not root.is_dir():
        raise _NotStreamable("not a local directory")
    where = _weight_files(root)
    dtype = getattr(torch, dtype_name)
    config = AutoConfig.from_pretrained(str(root))
    with init_empty_weights(include_buffers=False):  # parameters on "meta", buffers (rotary) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    want = {name for name, _ in model.named_parameters(remove_duplicate=True)}
    missing = sorted(want - set(where))
    if missing:
        raise _NotStreamable(f"{len(missing)} parameters not under their model names in the files (first: {missing[0]})")
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size)

    def read(names: list[str]) -> dict[str, Any]:
        # One mapping per module, closed before the next: the pages it touched leave the
        # process with it, instead of the whole file piling up as resident.
        out: dict[str, Any] = {}
        for file in {where[n] for n in names}:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for n in names:
                    if where[n] == file:
                        out[n] = f.get_tensor(n).to(dtype).clone()  # owns its memory, not the mapping's
        return out

    n_quant = 0
    for mod_name, mod in list(model.named_modules()):
        prefix = f"{mod_name}." if mod_name else ""
        # A tied LM head is not in the files: tie_weights() below points it at the embedding.
        own = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.device.type == "meta" and prefix + n in where]
        if not own:
            continue
        tensors = read([prefix + n for n, _ in own])
        if isinstance(mod, torch.nn.Linear) and mod_name.rsplit(".", 1)[-1] not in SKIP:
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            lin.weight = torch.nn.Parameter(tensors[prefix + "weight"], requires_grad=False)
            if mod.bias is not None:
                lin.bias = torch.nn.Parameter(tensors[prefix + "bias"], requires_grad=False)
            q = HQQLinear(lin, cfg, compute_dtype=dtype, device=device, del_orig=True)
            parent = model.get_submodule(mod_name.rsplit(".", 1)[0]) if "." in mod_name else model
            setattr(parent, mod_name.rsplit(".", 1)[-1], q)
            n_quant += 1
        else:
            for n, _ in own:
                setattr(mod, n, torch.nn.Parameter(tensors[prefix + n].to(device), requires_grad=False))
        del tensors
    model.tie_weights()  # the LM head shares the embedding just loaded
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise _NotStreamable(f"{len(left)} parameters not loaded (first: {left[0]})")
    model.eval()
    model.config.fl_quantized_base = {"method": "hqq", "bits": bits, "group_size": group_size}
    log.info("loaded %s with %d linear layers quantized to %d bits as they were read (HQQ, group %d)",
             id_or_path, n_quant, bits, group_size)
    return model


def _hqq_config_load(id_or_path: str, bits: int, group_size: int, device: str, dtype_name: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, HqqConfig

    q = HqqConfig(nbits=bits, group_size=group_size, skip_modules=list(SKIP))
    model = AutoModelForCausalLM.from_pretrained(id_or_path, quantization_config=q, device_map=device,
                                                 dtype=getattr(torch, dtype_name))
    model.config.fl_quantized_base = {"method": "hqq", "bits": bits, "group_size": group_size}
    return model


def enable_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass: activation memory drops from one set per layer
    to about one layer's worth, for roughly a third more compute (the planner counts both)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
