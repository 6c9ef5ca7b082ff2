"""The distilled student as a release directory: adapter merged, exported to ONNX with KV cache, optionally int8.

The one module that knows the exporter (optimum-onnx's ``main_export``), so a later switch to
``torch.onnx.export`` stays here (../shared/docs/STACK.md). The release directory is a standard
one: ``model.onnx``, ``config.json``, ``generation_config.json`` and the tokenizer files,
loadable by optimum's ``ORTModelForCausalLM`` and by a plain ``onnxruntime.InferenceSession``
(``fl_lm.onnx_session``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
TASK = "text-generation-with-past"  # inputs and outputs for the KV cache: one token per decode step


def merge(base: str, adapter: str | Path | None, out_dir: Path, peft_model: Any = None) -> Path:
    """Base plus LoRA adapter, merged into plain weights and saved with ``save_pretrained``.

    Either an adapter directory (PEFT format) or a PEFT model in memory; the in-memory model is
    copied first so the caller's adapter is not merged away.
    """
    import copy

    from fl_lm.loading import load_model, load_tokenizer

    if peft_model is not None:
        merged = _merge(copy.deepcopy(peft_model))
    else:
        model = load_model(base)
        if adapter is not None:
            from peft import PeftModel

            model = _merge(PeftModel.from_pretrained(model, str(adapter)))
        merged = model
    merged.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(base).save_pretrained(out_dir)
    return out_dir


def _merge(peft_model: Any) -> Any:
    """``merge_and_unload``, with the output projection untied first.

    The model in memory can project with a matrix that is no longer its input embedding (on the
    aggregator, where the adapted embedding is loaded into a tied model) while its config still
    says the two are tied; ``save_pretrained`` then writes one of them and the export ties them
    again. The parity gate caught it (max logit difference 2.3, tests/fl_sim/test_modes.py):
    untied explicitly, the release projects with exactly the matrix the trained model uses.
    """
    import torch

    base = peft_model.get_base_model()
    out = base.get_output_embeddings()
    if getattr(base.config, "tie_word_embeddings", False) and out is not None:
        out.weight = torch.nn.Parameter(out.weight.detach().clone())
        base.config.tie_word_embeddings = False
    return peft_model.merge_and_unload()


def export(merged_dir: Path, out_dir: Path, opset: int | None = None) -> Path:
    """``main_export`` with KV cache; writes ``out_dir/model.onnx`` beside config and tokenizer."""
    import warnings

    from optimum.exporters.onnx import main_export

    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's TracerWarnings are expected and say nothing to a user
        main_export(str(merged_dir), output=str(out_dir), task=TASK, opset=opset, device="cpu",
                    do_validation=False,  # our parity gate (fl_lm.onnx_parity) is the validation
                    local_files_only=True)
    if not (out_dir / ONNX_FILE).exists():
        raise RuntimeError(f"export wrote no {ONNX_FILE} in {out_dir}")
    return out_dir


def quantize_int8(src_dir: Path, out_dir: Path) -> Path:
    """Dynamic int8 weights (``onnxruntime.quantization.quantize_dynamic``); other files copied."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in src_dir.iterdir():
        if f.is_file() and not f.name.startswith(ONNX_FILE):
            shutil.copy2(f, out_dir / f.name)
    # Models over 2 GB keep their weights beside the graph (model.onnx_data); int8 output may too.
    external = any(p.name.startswith(ONNX_FILE + "_data") or p.suffix == ".data" for p in src_dir.iterdir())
    quantize_dynamic(str(src_dir / ONNX_FILE), str(out_dir / ONNX_FILE), weight_type=QuantType.QInt8,
                     use_external_data_format=external)
    return out_dir


def build_release_dir(base: str, out_dir: Path, *, adapter: str | Path | None = None, peft_model: Any = None,
                      int8: bool = False) -> Path:
    """Merge, export (and quantize): the finished directory, nothing else in it."""
    with tempfile.TemporaryDirectory(prefix="fl-export-") as tmp:
        t = Path(tmp)
        merged = merge(base, adapter, t / "merged", peft_model=peft_model)
        fp32 = export(merged, t / "fp32" if int8 else out_dir)
        if int8:
            quantize_int8(fp32, out_dir)
    return out_dir
