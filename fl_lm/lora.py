"""LoRA adapters with PEFT, and their state as plain numpy arrays for the wire."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.messages import LoraSpec


def save(peft_model: Any, directory: Any) -> None:
    """PEFT's standard adapter files, without the frozen base embedding (see ``get_adapter``).

    PEFT records the base as it was given to from_pretrained; a relative path there makes
    ``AutoPeftModelForCausalLM.from_pretrained(directory)`` fail from any other working directory,
    so a base that is a local directory is recorded as an absolute path (a hub id stays as it is).
    """
    import json
    import os
    from pathlib import Path

    peft_model.save_pretrained(directory, save_embedding_layers=False)
    cfg_path = Path(directory) / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    base = cfg.get("base_model_name_or_path")
    if base and not os.path.isabs(base) and Path(base).is_dir():
        cfg["base_model_name_or_path"] = str(Path(base).resolve())
        tmp = cfg_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        os.replace(tmp, cfg_path)


def attach_lora(model: Any, spec: LoraSpec, seed: int = 0) -> Any:
    """Wrap ``model`` in a PEFT LoRA model of shape ``spec`` (B starts at zero, A seeded)."""
    import torch
    from peft import LoraConfig, get_peft_model

    import warnings

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # LoRA on tied input embeddings adapts the inputs only; the (tied) LM head keeps the base
        # weights. That is what we train and aggregate; a merge for export must untie first.
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        return get_peft_model(model, cfg)


def get_adapter(peft_model: Any) -> dict[str, np.ndarray]:
    """The adapter's trainable weights under PEFT's standard state-dict names, as float32 copies."""
    from peft import get_peft_model_state_dict

    # Only the LoRA factors: with LoRA on the embeddings PEFT would also save the frozen base
    # embedding matrix ("auto"), which would then travel in every update for nothing.
    sd = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    return {k: v.detach().cpu().float().numpy().copy() for k, v in sd.items()}


def set_adapter(peft_model: Any, state: dict[str, np.ndarray]) -> None:
    """Load adapter weights; every expected tensor must be present with its exact shape."""
    import torch
    from peft import set_peft_model_state_dict

    current = get_adapter(peft_model)
    missing = sorted(set(current) - set(state))
    extra = sorted(set(state) - set(current))
    if missing or extra:
        raise ValueError(f"adapter mismatch: missing {missing[:3]}..., unexpected {extra[:3]}...")
    for k, v in state.items():
        if tuple(v.shape) != tuple(current[k].shape):
            raise ValueError(f"adapter tensor {k}: shape {tuple(v.shape)} != expected {tuple(current[k].shape)}")
    set_peft_model_state_dict(peft_model, {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in state.items()})


def add(a: dict[str, np.ndarray], b: dict[str, np.ndarray], scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: a[k] + scale * b[k] for k in a}


def sub(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: a[k] - b[k] for k in a}
