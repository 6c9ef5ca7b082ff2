"""``fl-models prune``: a student from a teacher by depth pruning (importance or evenly spaced
layers), recovered by distillation from the teacher on public data (``fl_lm.prune``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shared.cli import add_debug


def add_parser(sub: argparse._SubParsersAction) -> None:
    from fl_lm.prune import METHODS, PruneSettings
    from fl_lm.recover import RecoverySettings

    p, r = PruneSettings(keep=1), RecoverySettings()
    ap = sub.add_parser("prune", help="derive a student from a teacher by depth pruning, then recover it", description=__doc__)
    ap.add_argument("--model", required=True, help="the teacher's directory (e.g. from fl-models import)")
    ap.add_argument("--out", required=True, help="the directory to write (refused if it exists and is not empty)")
    n = ap.add_mutually_exclusive_group(required=True)
    n.add_argument("--keep", type=int, help="number of decoder layers to keep")
    n.add_argument("--keep-fraction", type=float, help="fraction of the decoder layers to keep, e.g. 0.33")
    ap.add_argument("--method", choices=METHODS, default=p.method,
                    help="importance: ShortGPT's block influence on --public; even: evenly spaced, first and last kept")
    ap.add_argument("--public", required=True, help="public data (JSONL or text, as fl-sim --data) to score and recover on")
    ap.add_argument("--heldout", type=int, default=p.heldout, help="public examples held out for the perplexity")
    ap.add_argument("--score-examples", type=int, default=p.score_examples)
    ap.add_argument("--recover-steps", type=int, default=r.steps, help="distillation steps after pruning (0: none)")
    ap.add_argument("--batch-size", type=int, default=r.batch_size)
    ap.add_argument("--seq-len", type=int, default=r.max_len, help="tokens per example (scoring, recovery, held-out)")
    ap.add_argument("--lr", type=float, default=r.lr)
    ap.add_argument("--kd-alpha", type=float, default=r.kd_alpha, help="weight of the LM loss beside the KD term")
    ap.add_argument("--seed", type=int, default=p.seed)
    ap.add_argument("--force", action="store_true", help="replace --out if it is an existing model directory")
    add_debug(ap)
    ap.set_defaults(body=_run)


def _run(args: argparse.Namespace) -> None:
    from fl_lm.loading import check_model_source
    from fl_lm.model_dir import check_out
    from fl_lm.prune import PruneSettings, prune
    from fl_lm.recover import RecoverySettings
    from shared.datasets import load_file

    out = Path(args.out)
    check_out(out, args.force)
    check_model_source(args.model, "--model")
    s = PruneSettings(method=args.method, keep=args.keep, keep_fraction=args.keep_fraction, score_examples=args.score_examples,
                      max_len=args.seq_len, heldout=args.heldout, seed=args.seed)
    r = RecoverySettings(steps=args.recover_steps, batch_size=args.batch_size, max_len=args.seq_len, lr=args.lr,
                         kd_alpha=args.kd_alpha)
    public = load_file(args.public)
    card = prune(Path(args.model), out, public, s, r, force=args.force)
    pr = card["pruning"]
    rec = pr["recovery"]
    summary = {"out": str(out), "kept_layers": pr["kept_layers"], "parameters": card["parameters"],
               "teacher_ppl": rec["teacher_ppl"], "heldout_ppl_before": rec["heldout_ppl_before"],
               "heldout_ppl_after": rec["heldout_ppl_after"]}
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
