"""A model directory as ``fl-models import`` and ``fl-models prune`` write it: ``save_pretrained``
files plus a model card, written beside the target and renamed into place.

The card is two files saying the same thing: ``fl_model_card.json`` for programs (a benchmark or
``fl-sim`` reads the source, licence and pruning figures from it) and ``README.md`` with YAML front
matter for people and for the hub's card format, should the directory ever be uploaded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CARD_FILE = "fl_model_card.json"
CARD_SCHEMA = "fl-model-card/1"
# What marks a directory as a model this tool may replace with --force: anything else (a home
# directory, a data folder) is refused even then, so a mistyped --out never deletes a user's files.
_MODEL_MARKERS = (CARD_FILE, "config.json")


def check_out(out: Path, force: bool) -> None:
    """Refuse, before any work, an output that exists and is not empty (unless ``force`` and it is a model directory)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    names = {p.name for p in out.iterdir()}
    if not names:
        return
    if not force:
        raise FileExistsError(f"{out}: exists and is not empty; pass --force to replace it")
    if not names & set(_MODEL_MARKERS):
        raise FileExistsError(f"{out}: exists and is not a model directory (no {' or '.join(_MODEL_MARKERS)}); "
                              "not replacing it even with --force")


@contextmanager
def writing(out: Path, force: bool) -> Iterator[Path]:
    """A fresh directory beside ``out`` to write into; renamed to ``out`` when the block succeeds.

    A failed or interrupted import leaves ``out`` as it was, never half a model that loads.
    """
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would follow the model into place, unreadable to others.
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted run of this same process id
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_card(directory: Path, card: dict[str, Any]) -> None:
    """``fl_model_card.json`` and ``README.md`` (YAML front matter, then a short human summary)."""
    card = {"schema": CARD_SCHEMA, **card}
    (directory / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    (directory / "README.md").write_text(_readme(card))


def read_card(directory: Path) -> dict[str, Any] | None:
    """The card of a directory this tool wrote, or None for any other model directory."""
    p = directory / CARD_FILE
    if not p.is_file():
        return None
    card = json.loads(p.read_text())
    if not isinstance(card, dict) or card.get("schema") != CARD_SCHEMA:
        raise ValueError(f"{p}: not an {CARD_SCHEMA} model card")
    return card


def _yaml_scalar(v: Any) -> str:
    # JSON strings are valid YAML scalars, so the front matter needs no YAML library.
    return json.dumps(v)


def _readme(card: dict[str, Any]) -> str:
    src = card.get("source", {})
    front = {
        "license": _spdx_to_hub(card.get("licence")),
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["fl-minillm", *(["gguf-import"] if src.get("kind") in ("gguf", "package") else []),
                 *(["depth-pruned"] if card.get("pruning") else [])],
    }
    lines = ["---"]
    for k, v in front.items():
        if v is None:
            continue
        if isinstance(v, list):
            lines.append(f"{k}:")
            lines += [f"- {_yaml_scalar(x)}" for x in v]
        else:
            lines.append(f"{k}: {_yaml_scalar(v)}")
    lines += ["---", "", f"# {card.get('name', 'model')}", ""]
    arch = card.get("architecture", {})
    lines.append(f"{arch.get('class', '?')}, {arch.get('num_hidden_layers', '?')} layers, hidden {arch.get('hidden_size', '?')}, "
                 f"vocabulary {arch.get('vocab_size', '?')}, {card.get('parameters', 0):,} parameters.")
    lines += ["", "## Source", ""] + [f"- {k}: {v}" for k, v in src.items() if v is not None]
    lines.append(f"- licence: {card.get('licence')} ({card.get('licence_from')})")
    pr = card.get("pruning")
    if pr:
        lines += ["", "## Depth pruning", "", f"- method: {pr['method']}, kept {len(pr['kept_layers'])} of {pr['source_layers']} "
                  f"layers: {pr['kept_layers']}"]
        rec = pr.get("recovery") or {}
        if rec.get("steps"):
            lines.append(f"- recovery: {rec['steps']} steps of distillation from the unpruned model; held-out perplexity "
                         f"{rec['heldout_ppl_before']:.2f} -> {rec['heldout_ppl_after']:.2f} (teacher {rec['teacher_ppl']:.2f})")
    lines += ["", f"Machine-readable: `{CARD_FILE}`.", ""]
    return "\n".join(lines)


def _spdx_to_hub(licence: Any) -> Any:
    # The hub's card metadata uses lower-case ids (apache-2.0); SPDX spells them Apache-2.0.
    return licence.lower() if isinstance(licence, str) and licence not in ("unknown", "") else "other"
