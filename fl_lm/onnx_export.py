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

    Merged on the CPU in float32 wherever the model trained (``fl_lm.device``): the exporter traces
    on the CPU (``export``, optimum's ``device="cpu"``), and the weights that ship are then the
    same arithmetic whatever the accelerator. (The copy is taken where the model is, then moved.)
    """
    import copy

    import torch

    from fl_lm.loading import load_model, load_tokenizer

    if peft_model is not None:
        merged = _merge(copy.deepcopy(peft_model).to("cpu", torch.float32))
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

    Where the two matrices are still equal after the merge (no adapter on the embeddings, as for
    the real pair), they are tied again: the export then carries the matrix once, not a second
    copy (28.3M parameters, 113 MB of float32, on SmolLM2's 49,152 x 576 embedding).
    """
    import torch

    base = peft_model.get_base_model()
    out = base.get_output_embeddings()
    tied = bool(getattr(base.config, "tie_word_embeddings", False)) and out is not None
    if tied:
        out.weight = torch.nn.Parameter(out.weight.detach().clone())
        base.config.tie_word_embeddings = False
    merged = peft_model.merge_and_unload()
    if tied:
        emb, head = merged.get_input_embeddings(), merged.get_output_embeddings()
        if emb.weight.shape == head.weight.shape and torch.equal(emb.weight, head.weight):
            head.weight = emb.weight
            merged.config.tie_word_embeddings = True
    return merged


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


# Dynamic int8 recipes, smallest first; the release ships the first that passes the parity gate
# (aggregator.release). "full": every MatMul and the embedding Gather, one scale per weight
# tensor (onnxruntime's default; 3.7-3.9x smaller, 98-100% agreement on the toy student, STACK.md).
# "outlier-safe": MatMuls only, a scale per output channel, and the MLP down-projections kept in
# float32: their inputs (the gated activations) carry the outliers that dynamic per-tensor
# activation scales round away (LLM.int8()'s observation), and the embedding, tied to the head,
# stays float32 for the logits. On the real 63.7M student "full" agreed on 73.9% of next tokens
# (the gate asks 90%), "outlier-safe" on 94.6% with the loss unchanged, 1.45x smaller (README, "Real models").
INT8_RECIPES = ("full", "outlier-safe")


def quantize_int8(src_dir: Path, out_dir: Path, recipe: str = "full") -> Path:
    """Dynamic int8 weights (``onnxruntime.quantization.quantize_dynamic``) by ``recipe``
    (``INT8_RECIPES``); other files copied."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if recipe not in INT8_RECIPES:
        raise ValueError(f"int8 recipe must be one of {INT8_RECIPES}, got {recipe!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in src_dir.iterdir():
        if f.is_file() and not f.name.startswith(ONNX_FILE):
            shutil.copy2(f, out_dir / f.name)
    # Models over 2 GB keep their weights beside the graph (model.onnx_data); int8 output may too.
    external = any(p.name.startswith(ONNX_FILE + "_data") or p.suffix == ".data" for p in src_dir.iterdir())
    kw: dict[str, Any] = {}
    if recipe == "outlier-safe":
        graph = onnx.load(str(src_dir / ONNX_FILE), load_external_data=False).graph
        keep = [n.name for n in graph.node if n.op_type == "MatMul" and "down_proj" in n.name]
        kw = dict(op_types_to_quantize=["MatMul"], per_channel=True, nodes_to_exclude=keep)
    quantize_dynamic(str(src_dir / ONNX_FILE), str(out_dir / ONNX_FILE), weight_type=QuantType.QInt8,
                     use_external_data_format=external, **kw)
    return out_dir


def build_release_dir(base: str, out_dir: Path, *, adapter: str | Path | None = None, peft_model: Any = None,
                      int8: bool = False, recipe: str = "full") -> Path:
    """Merge, export (and quantize by ``recipe``): the finished directory, nothing else in it."""
    with tempfile.TemporaryDirectory(prefix="fl-export-") as tmp:
        t = Path(tmp)
        merged = merge(base, adapter, t / "merged", peft_model=peft_model)
        fp32 = export(merged, t / "fp32" if int8 else out_dir)
        if int8:
            quantize_int8(fp32, out_dir, recipe)
    return out_dir
