"""The real pair (issue 21): where ``make models-real`` puts the imported teacher and its pruned
student, whether they are there, and the round sizes that fit them on a 2-core CPU box.

``fl-sim --data FILE`` without ``--student``/``--teacher`` uses the real pair when it is installed
(``DEFAULT_DIR``, or the directory ``FL_REAL_MODELS`` names), saying so in one line; otherwise
``fl_sim.run.launch`` builds the toy pair and says in one warning line that it is sized for the
synthetic tasks. A student that ``fl-models import`` or ``prune`` wrote (it has a model card) gets
``REAL_SIZING`` for every setting the command line leaves alone, whichever way it was chosen.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_lm.model_dir import CARD_FILE

if TYPE_CHECKING:
    from fl_sim.run import SimSettings

log = logging.getLogger(__name__)

ENV = "FL_REAL_MODELS"  # a directory with teacher/ and student/, instead of DEFAULT_DIR
# Where `make models-real` writes them (REAL_DIR in the Makefile), under the project root: the
# directory holding this package, which is the clone for `make` and `pip install -e`.
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "models" / "real"
MAKE_TARGET = "make models-real"

# What the built-in toy pair does on real text, measured (issue 21): fl-sim --data on held-out
# Alpaca ended at 6.09 nats per token, worse than a unigram model of the training text (5.91).
TOY_ON_ALPACA_NATS = 6.09
UNIGRAM_ON_ALPACA_NATS = 5.91

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# SimSettings for a real student (SmolLM2-135M-Instruct's 63.7M-parameter, 10-layer copy; its
# 134.5M teacher) on 2 shared CPU cores, so that a run of any mode ends in minutes. Measured
# here: a LoRA step of 4 x 256 tokens about 3.2 s on both cores for the student, 6.8 s for the teacher.
REAL_SIZING: dict[str, Any] = {
    "rounds": 2,  # fl-minillm's two roles once each; --rounds for more
    # cpu-dev's memory and threads at 4 x 256 tokens a step instead of 8 x 128: the same
    # tokens, and 97% of Alpaca's answer tokens kept instead of 76% (chat template included).
    "profile": "cpu-dev-long",
    "max_seq_len": 256,  # the aggregator's evaluation, distillation and LM batches, as the devices'
    "local_steps": 8,  # 32 examples a device a round: about a minute with three devices on two cores
    # All linear layers and not the input embeddings: on a 49,152-token vocabulary a rank-16
    # embedding adapter is 0.8M more values a device a round (+49% on 1.6M) for rows that a few
    # hundred examples barely touch, and a pretrained model's embeddings need no help with the format.
    "lora_targets": LINEAR_TARGETS,
    "distil_steps": 4,  # per direction; a teacher step at batch 4 x 256 is ~7 s here
    "distil_batch_size": 4,
    "minillm_steps": 2,  # rollout batches; each token of a rollout is a forward of both models
    "minillm_prompts": 4,
    "minillm_new_tokens": 16,
    "eval_per_family": 20,  # held-out examples scored each round, by the student and the teacher
    "eval_batch_size": 8,  # 8 x 256 x 49,152 float32 logits are 400 MB; 32 would be 1.6 GB
    "aggregator_threads": 0,  # torch's default (both cores): the devices are idle while it distils
    "round_timeout_s": 900.0,  # a deadline, not a wait: the updates come after a minute or two
}


@dataclass(frozen=True)
class RealPair:
    teacher: Path
    student: Path


def location() -> Path:
    return Path(os.environ[ENV]) if os.environ.get(ENV) else DEFAULT_DIR


def find(root: Path | None = None) -> RealPair | None:
    """The pair under ``root`` (default ``location()``) when both models are there, finished
    (each directory has the model card ``fl-models`` writes last), else None."""
    d = (root if root is not None else location()).resolve()  # the processes' configs name it from anywhere
    pair = RealPair(teacher=d / "teacher", student=d / "student")
    return pair if all((p / CARD_FILE).is_file() for p in (pair.teacher, pair.student)) else None


def is_imported(model: str | None) -> bool:
    """Whether ``model`` is a directory ``fl-models import`` or ``prune`` wrote (not a toy one)."""
    return model is not None and (Path(model) / CARD_FILE).is_file()


def choose(s: SimSettings, given: Collection[str], root: Path | None = None) -> SimSettings:
    """``s`` with the real pair where it applies, and ``REAL_SIZING`` for an imported student.

    ``given``: the SimSettings fields the user set; sizing never overrides them. The pair is taken
    only with ``data`` and neither ``student`` nor ``teacher`` given, and only if installed; when it
    is not, ``s`` comes back unchanged (``fl_sim.run.launch`` then warns about the toy pair).
    """
    if s.data and not s.student and not s.teacher:
        pair = find(root)
        if pair is not None:
            s = dataclasses.replace(s, student=str(pair.student), teacher=str(pair.teacher))
            log.info("--data without --student/--teacher: using the real pair installed in %s (teacher %s, student %s; "
                     "%s=DIR looks elsewhere, --student/--teacher override)", pair.student.parent, _name(pair.teacher),
                     _name(pair.student), ENV)
    if not is_imported(s.student):
        return s
    sized = {k: v for k, v in REAL_SIZING.items() if k not in given}
    if sized:
        log.info("sized for a real student (flags override): %s",
                 ", ".join(f"{k} {','.join(v) if isinstance(v, tuple) else v}" for k, v in sized.items()))
    return dataclasses.replace(s, **sized)


def _name(model: Path) -> str:
    """The card's name and size of a model directory, for a log line (the directory name if unreadable)."""
    try:
        card = json.loads((model / CARD_FILE).read_text())
        return f"{card['name']}, {card['parameters'] / 1e6:.1f}M params"
    except (OSError, ValueError, KeyError, TypeError):
        return model.name


def toy_on_real_text_warning() -> str:
    """The one line fl-sim logs when it builds the toy pair for a user's own text."""
    return (f"the built-in models are sized for the synthetic tasks, not real text: on held-out Alpaca the toy pair ends "
            f"at ~{TOY_ON_ALPACA_NATS} nats/token against a unigram {UNIGRAM_ON_ALPACA_NATS}; `{MAKE_TARGET}` imports a "
            f"pretrained teacher and its pruned student (SmolLM2-135M-Instruct), which fl-sim --data then uses")
