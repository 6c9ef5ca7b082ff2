"""What every mode with a teacher on the aggregator shares: hosting it, scoring it, checkpointing it."""

from __future__ import annotations

import logging
from typing import Any

from aggregator.model import HostedModel
from aggregator.modes import ModeContext
from aggregator.record import ModelEvals
from shared import messages as M

log = logging.getLogger(__name__)


class WithTeacher:
    """The teacher (any causal LM by id or path) with its own LoRA, in PEFT's format like the student's."""

    def __init__(self, ctx: ModeContext, mode: str) -> None:
        c = ctx.cfg
        if c.teacher is None:
            raise ValueError(f"mode {mode} needs a teacher (a model id or path)")
        if not ctx.public:
            raise ValueError(f"mode {mode} needs public examples (public_data)")
        self.ctx = ctx
        lora = M.LoraSpec(r=c.teacher_lora.r, alpha=c.teacher_lora.alpha, dropout=c.teacher_lora.dropout,
                          target_modules=c.teacher_lora.target_modules)
        # Beside the student, on the device the aggregator's config placed it on (fl_lm.device).
        self.teacher = HostedModel("teacher", c.teacher, lora, seed=c.seed + 1, max_seq_len=c.max_seq_len,
                                   eval_batch_size=c.eval_batch_size, placement=ctx.student.placement)

    def evaluate(self) -> ModelEvals | None:
        priv = self.teacher.evaluate(self.ctx.eval_private)
        pub = self.teacher.evaluate(self.ctx.eval_public) if self.ctx.eval_public else None
        return ModelEvals(priv, pub)

    def checkpoint_models(self) -> dict[str, Any]:
        return {"teacher": self.teacher.peft}

    def resume(self, checkpoints: dict[str, str]) -> None:
        if "teacher" in checkpoints:
            self.teacher.load(checkpoints["teacher"])
            log.info("teacher adapter resumed from %s", checkpoints["teacher"])
