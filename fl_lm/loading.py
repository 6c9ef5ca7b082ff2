"""Load tokenizers and models by id or path, the same way for a real hub id and our offline ones."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def load_tokenizer(id_or_path: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(id_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(id_or_path: str, dtype: str = "float32") -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    # float32 on CPU: bf16/fp16 matmuls are many times slower there (STACK.md).
    return AutoModelForCausalLM.from_pretrained(id_or_path, dtype=getattr(torch, dtype))


def param_count(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def base_digest(model: Any) -> str:
    """SHA-256 over the base weights (name, dtype, shape, bytes), sorted by name.

    Both sides compute it from what they loaded, so a round is refused when a device's base is not
    the aggregator's; no path ever travels.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        arr = t.detach().cpu().contiguous().numpy()
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(np.asarray(arr.shape, dtype=np.int64).tobytes())
        h.update(arr.tobytes())
    return h.hexdigest()
