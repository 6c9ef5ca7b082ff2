"""Load tokenizers and models by id or path, the same way for a real hub id and our offline ones."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_source(id_or_path: str, what: str = "model") -> None:
    """Refuse, in one line, a model that ``load_model`` could not load: checked before any process
    starts, so a typo is not found in a subprocess's log as a hub repo-id error.

    An existing directory must hold a causal-LM config, weights and a tokenizer. Anything that
    looks like a path (absolute, ./, ../, ~, or more than one /) must exist. A hub id is checked by
    loading its config (from the local cache when offline).
    """
    from shared.errors import ConfigError

    p = Path(id_or_path).expanduser()
    looks_like_path = id_or_path.startswith(("/", ".", "~")) or id_or_path.count("/") > 1 or "\\" in id_or_path
    if p.is_dir():
        names = {x.name for x in p.iterdir()}
        if "config.json" not in names:
            kind = "a tokenizer directory" if names & set(TOKENIZER_FILES) else "not a model directory"
            raise ConfigError(f"{what} {id_or_path}: {kind} (no config.json); give the directory from save_pretrained "
                              "or `fl-models build`")
        if not names & set(WEIGHT_FILES):
            raise ConfigError(f"{what} {id_or_path}: no weights ({' or '.join(WEIGHT_FILES[::2])})")
        if not names & set(TOKENIZER_FILES):
            raise ConfigError(f"{what} {id_or_path}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    elif p.exists():
        raise ConfigError(f"{what} {id_or_path}: is a file; give the model's directory")
    elif looks_like_path:
        raise ConfigError(f"{what} {id_or_path}: no such directory")
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(id_or_path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{what} {id_or_path}: cannot load its config ({type(e).__name__}: {first[:200]})") from None
    if getattr(cfg, "is_encoder_decoder", False):
        raise ConfigError(f"{what} {id_or_path}: an encoder-decoder model; a causal (decoder-only) LM is needed")


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


def base_digest(model: Any, source: str | None = None) -> str:
    """SHA-256 over the base weights (name, dtype, shape, bytes), sorted by name.

    Both sides compute it the same way, so a round is refused when a device's base is not the
    aggregator's; no path ever travels. With ``source`` a local directory of safetensors files it
    is computed from the files, one tensor at a time: a device that loads its base quantized
    (fl_lm.quantized) proves which base it has without a float copy to hash.
    """
    if source is not None and digest_reads_files(source):
        return file_digest(Path(source))
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        arr = t.detach().cpu().contiguous().numpy()
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(np.asarray(arr.shape, dtype=np.int64).tobytes())
        h.update(arr.tobytes())
    return h.hexdigest()


def digest_reads_files(source: str) -> bool:
    """Whether ``base_digest`` of ``source`` comes from its files, whatever dtype it is loaded in
    (a local directory of safetensors), rather than from the weights in memory."""
    return Path(source).is_dir() and bool(sorted(Path(source).glob("*.safetensors")))


def file_digest(directory: Path) -> str:
    """``base_digest`` of the safetensors files in ``directory`` (all shards), streamed per tensor."""
    import torch
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                where[k] = f
    h = hashlib.sha256()
    h.update(b"safetensors-v1")  # never equal to a state-dict digest by accident
    for k in sorted(where):
        with safe_open(str(where[k]), framework="pt") as sf:
            t = sf.get_tensor(k)
        raw = t.contiguous().view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(np.asarray(tuple(t.shape), dtype=np.int64).tobytes())
        h.update(raw.tobytes())
    return h.hexdigest()
