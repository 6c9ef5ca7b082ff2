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


def load_quantized(id_or_path: str, bits: int, group_size: int = GROUP_SIZE) -> Any:
    """The base, quantized as it loads (transformers' HqqConfig), as the device loads it. On CPU the
    load still peaks at 2.3-3.2 GB for the 0.5B shape, above its 1.9 GB of fp32 weights
    (benchmarks/edge_train.py); the GPU case is not measured here."""
    import torch
    from transformers import AutoModelForCausalLM, HqqConfig

    if bits not in BITS:
        raise ValueError(f"quantized base: bits must be one of {BITS}, got {bits}")
    cuda = torch.cuda.is_available()
    q = HqqConfig(nbits=bits, group_size=group_size, skip_modules=list(SKIP))
    model = AutoModelForCausalLM.from_pretrained(id_or_path, quantization_config=q, device_map="cuda" if cuda else "cpu",
                                                 dtype=torch.float16 if cuda else torch.float32)
    model.config.fl_quantized_base = {"method": "hqq", "bits": bits, "group_size": group_size}
    return model


def enable_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass: activation memory drops from one set per layer
    to about one layer's worth, for roughly a third more compute (the planner counts both)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
