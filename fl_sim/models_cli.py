"""``fl-models``: build the offline teacher, student and tokenizer (no model hub needed)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fl_lm.build import build_offline_models
from fl_sim import tasks
from fl_sim.prepare import public_examples

PRETRAIN_STEPS = 300  # enough for the 0.4M-param student to learn the prompt format (~10 s)


def default_corpus(seed: int, per_family: int = 200) -> list[str]:
    fams = list(tasks.PRIVATE_FAMILIES) + list(tasks.PUBLIC_FAMILIES)
    return [e.prompt + e.output for f in fams for e in tasks.generate(f, per_family, seed + 17)]


def build_default(out: Path, seed: int = 0, pretrain_steps: int = PRETRAIN_STEPS, extra_corpus: list[str] | None = None) -> dict[str, str]:
    corpus = default_corpus(seed) + list(extra_corpus or [])
    return build_offline_models(out, corpus, public_examples(300, seed), pretrain_steps=pretrain_steps, seed=seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fl-models", description=__doc__)
    ap.add_argument("--out", required=True, help="directory for tokenizer/, student/, teacher/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    paths = build_default(Path(args.out), args.seed, args.pretrain_steps)
    sys.stdout.write(json.dumps(paths, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
