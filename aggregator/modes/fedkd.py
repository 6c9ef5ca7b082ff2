"""``fedkd``: after FedAvg, mutual token-level distillation between the aggregated student and a
larger teacher on the aggregator's public set (FedMKT's selective transfer, FedCoLLM's round).

Per round, student to teacher first: the teacher's own LoRA learns from the fleet's freshly
aggregated student (DualMinCE: only on public samples the student fits better), which is how the
fleet's domain knowledge reaches the large model. Then teacher to student: the student learns
from the teacher (again selectively); that distilled student is the next round's global model.
Different tokenizers are bridged with the MinED map and DTW alignment (``fl_lm.align``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aggregator.modes import ModeContext
from aggregator.modes.teacher import WithTeacher

log = logging.getLogger(__name__)


class FedKD(WithTeacher):
    name = "fedkd"

    def __init__(self, ctx: ModeContext) -> None:
        from fl_lm.distil import Distiller, KDSettings

        super().__init__(ctx, self.name)
        c = ctx.cfg
        d = c.distil
        common = dict(kind=d.loss, beta=d.beta, temperature=d.temperature, top_k=d.top_k, kd_alpha=d.kd_alpha,
                      batch_size=d.batch_size, max_len=c.max_seq_len, selective=d.selective,
                      balance_families=d.balance_families)
        self.to_student = KDSettings(steps=d.student_steps, lr=d.student_lr, **common)  # type: ignore[arg-type]
        self.to_teacher = KDSettings(steps=d.teacher_steps, lr=d.teacher_lr, **common)  # type: ignore[arg-type]
        cache = ctx.out / "align"
        self.t2s = Distiller(ctx.student.tok, self.teacher.tok, ctx.public, c.max_seq_len, cache)
        self.s2t = Distiller(self.teacher.tok, ctx.student.tok, ctx.public, c.max_seq_len, cache)
        log.info("fedkd: teacher %s (%d params) and student (%d params) on %d public examples, %s tokenizer%s",
                 c.teacher, self.teacher.params, ctx.student.params, len(ctx.public),
                 "one" if self.t2s.same else "different", "" if self.t2s.same else "s (MinED + DTW alignment)")

    def scoring(self, rnd: int) -> None:
        return None

    def take_fleet(self, rnd: int, scores: Any) -> None:
        return None

    def distil(self, rnd: int) -> dict[str, Any] | None:
        t0 = time.monotonic()
        seed = self.ctx.cfg.seed * 100_003 + rnd
        s, t = self.ctx.student, self.teacher
        to_t = self.s2t.run(t.peft, s.peft, self.to_teacher, seed)
        t.pull_state()
        to_s = self.t2s.run(s.peft, t.peft, self.to_student, seed + 1)
        s.pull_state()
        out = {"teacher_from_student": to_t.__dict__, "student_from_teacher": to_s.__dict__,
               "seconds": round(time.monotonic() - t0, 3)}
        log.info("round %d: distilled in %.1fs (student->teacher %d steps, KD %.3f->%.3f, %.0f%% of samples from the "
                 "student; teacher->student %d steps, KD %.3f->%.3f, %.0f%% from the teacher)", rnd, out["seconds"],
                 to_t.steps, to_t.kd_first, to_t.kd_last, 100 * to_t.from_guide,
                 to_s.steps, to_s.kd_first, to_s.kd_last, 100 * to_s.from_guide)
        return out


def make(ctx: ModeContext) -> FedKD:
    return FedKD(ctx)
