"""``fl-minillm``: sequence-level distillation (MiniLLM) with the roles alternating every round.

After FedAvg in every round (the devices' local fine-tuning is the seed's "SFT clients"):

- a *client* round, the fleet teaches: while planning, the aggregator's teacher samples
  continuations of public prompts and takes its top-k per position as the candidates; they go out
  in the signed round spec. Each device scores them with its locally trained student and adds its
  probabilities (K + 1 buckets a position) to its masked update, so secure aggregation yields only
  the fleet's weighted mean distribution. The teacher then learns it with the MiniLLM objective
  (``fl_lm.fleet_teacher.fleet_step``): FedMKT ships every party's logits in the clear and the
  FL-MiniLLM prototype pools them in one process; here no device's outputs are ever seen alone.
- a *server* round, the teacher teaches: the global student samples with teacher-mixed sampling
  and minimises the sequence-level reverse KL to the teacher (``fl_lm.minillm.minillm_step``); the
  distilled student is the next round's global model.

MiniLLM does not support different tokenizers (LMOps#66), so the teacher must share the student's.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import numpy as np

from aggregator.modes import ModeContext
from aggregator.modes.teacher import WithTeacher
from fl_lm.data import prompt_text
from shared import messages as M
from shared import tensors

log = logging.getLogger(__name__)


class FLMiniLLM(WithTeacher):
    name = "fl-minillm"

    def __init__(self, ctx: ModeContext) -> None:
        from fl_lm import align
        from fl_lm.minillm import MiniLLMSettings

        super().__init__(ctx, self.name)
        c = ctx.cfg
        self.m = c.minillm
        if align.vocab_digest(self.teacher.tok) != align.vocab_digest(ctx.student.tok):
            raise ValueError("mode fl-minillm needs the teacher to share the student's tokenizer (MiniLLM does not "
                             "align vocabularies); use mode fedkd for a teacher with its own")
        m = self.m
        self.settings = MiniLLMSettings(alpha=m.alpha, gamma=m.gamma, clip=m.clip, max_new_tokens=m.max_new_tokens,
                                        lm_coef=m.lm_coef, ppo_epochs=m.ppo_epochs)
        tok = ctx.student.tok
        self.eos = tok.eos_token_id
        # Prompts grouped by token length: a rollout batch needs prompts of one length (no padding).
        self.by_len: dict[int, list[list[int]]] = {}
        for e in ctx.public:
            prompt = prompt_text(tok, e)
            ids = tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
            if 0 < len(ids) < c.max_seq_len - m.max_new_tokens:
                self.by_len.setdefault(len(ids), []).append(ids)
        if not self.by_len:
            raise ValueError("mode fl-minillm: no public example has a prompt short enough to continue")
        self.lengths = sorted(self.by_len, key=lambda n: -len(self.by_len[n]))[:8]  # the most common lengths
        self.pending: dict[str, Any] | None = None  # the open client round's rollouts
        self.fleet: tuple[int, np.ndarray] | None = None
        log.info("fl-minillm: roles %s, %d prompts of %d tokens or so a round, %d new tokens, %d candidates",
                 list(m.roles), m.prompts, self.lengths[0], m.max_new_tokens, m.candidates)

    def role(self, rnd: int) -> str:
        return self.m.roles[(rnd - 1) % len(self.m.roles)]

    def _prompts(self, rnd: int) -> Any:
        import torch

        rng = random.Random(self.ctx.cfg.seed * 7919 + rnd)
        pool = self.by_len[self.lengths[rnd % len(self.lengths)]]
        picked = [pool[rng.randrange(len(pool))] for _ in range(self.m.prompts)]
        return torch.tensor(picked, dtype=torch.long)

    def _lm_batch(self, rnd: int) -> dict[str, Any] | None:
        from fl_lm.data import collate, encode_example

        if self.settings.lm_coef <= 0:
            return None
        rng = random.Random(self.ctx.cfg.seed * 104_729 + rnd)
        picked = [self.ctx.public[rng.randrange(len(self.ctx.public))] for _ in range(self.m.prompts)]
        tok = self.ctx.student.tok
        return collate(tok, [encode_example(tok, e, self.ctx.cfg.max_seq_len) for e in picked])

    def _generator(self, rnd: int, salt: int) -> Any:
        import torch

        return torch.Generator().manual_seed(self.ctx.cfg.seed * 1_000_003 + rnd * 31 + salt)

    # -- the round loop's hooks ------------------------------------------------------------------
    def scoring(self, rnd: int) -> M.ScoringSpec | None:
        """A client round's rollouts: the teacher samples, its top-k per position are the candidates."""
        import torch

        from fl_lm import fleet_teacher as ft
        from fl_lm import minillm as ml

        self.pending, self.fleet = None, None
        if self.role(rnd) != "client" or self.m.steps == 0:
            return None
        model = self.teacher.peft
        model.eval()
        prompts = self._prompts(rnd)
        p_len = prompts.size(1)
        roll = ml.generate_mixed(model, model, prompts, self.m.max_new_tokens, 0.0, self.eos, self._generator(rnd, 1))
        tokens = roll.ids[:, p_len:]
        with torch.no_grad():
            logits = ml.response_logits(model, roll.ids, p_len)  # (B, N, V)
            cand = ft.candidates(logits, tokens, min(self.m.candidates, logits.size(-1)))
            old_logp = ml.token_logp(logits, tokens)
        b, n, k = cand.shape
        self.pending = {"rnd": rnd, "ids": roll.ids, "p_len": p_len, "cand": cand, "mask": roll.mask, "old_logp": old_logp}
        return M.ScoringSpec(rollouts=b, positions=n, k=k, prompt_len=p_len, tensors=tensors.pack({
            "ids": roll.ids.cpu().numpy().astype(np.int32), "candidates": cand.cpu().numpy().astype(np.int32),
            "mask": roll.mask.cpu().numpy().astype(np.uint8)}))

    def take_fleet(self, rnd: int, scores: Any) -> None:
        """Keep the fleet's mean scores for this round's distillation, and write them: they are the
        aggregate the aggregator is meant to learn (an auditor can check they are only that)."""
        self.fleet = (rnd, np.asarray(scores, dtype=np.float64))
        d = self.ctx.out / "fleet"
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / f"round_{rnd:04d}_scores.npy", self.fleet[1], allow_pickle=False)

    def distil(self, rnd: int) -> dict[str, Any] | None:
        t0 = time.monotonic()
        role = self.role(rnd)
        out: dict[str, Any] = {"role": role}
        if self.m.steps == 0:
            out["skipped"] = "minillm.steps = 0"
        elif role == "client":
            out.update(self._from_fleet(rnd))
        else:
            out.update(self._to_student(rnd))
        out["seconds"] = round(time.monotonic() - t0, 3)
        log.info("round %d: fl-minillm %s round, distilled in %.1fs: %s", rnd, role, out["seconds"],
                 {k: v for k, v in out.items() if k not in ("role", "seconds")})
        return out

    def _from_fleet(self, rnd: int) -> dict[str, Any]:
        """The teacher learns the fleet's mean distribution on its own rollouts."""
        import torch

        from fl_lm import fleet_teacher as ft

        p = self.pending
        if p is None or p["rnd"] != rnd or self.fleet is None or self.fleet[0] != rnd:
            return {"skipped": "no fleet scores this round"}
        b, n, k = p["cand"].shape
        target = ft.from_mean(self.fleet[1], b, n, k, p["mask"])
        model = self.teacher.peft
        opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=self.m.teacher_lr)
        first = last = None
        for i in range(self.m.steps):
            st = ft.fleet_step(model, opt, p["ids"], p["p_len"], p["cand"], p["mask"], target, p["old_logp"],
                               self.settings, self._lm_batch(rnd * 100 + i))
            first, last = first or st, st
        self.teacher.pull_state()
        self.pending = self.fleet = None
        assert first is not None and last is not None
        return {"learner": "teacher", "steps": self.m.steps, "single_step_first": first["single_step"],
                "single_step_last": last["single_step"], "reward_first": first["reward"], "reward_last": last["reward"]}

    def _to_student(self, rnd: int) -> dict[str, Any]:
        """The global student learns the teacher (MiniLLM with teacher-mixed sampling)."""
        import torch

        from fl_lm import minillm as ml

        student, teacher = self.ctx.student.peft, self.teacher.peft
        opt = torch.optim.Adam([q for q in student.parameters() if q.requires_grad], lr=self.m.student_lr)
        g = self._generator(rnd, 2)
        stats = [ml.minillm_step(student, teacher, opt, self._prompts(rnd * 100 + i), self._lm_batch(rnd * 100 + i),
                                 self.settings, self.eos, g) for i in range(self.m.steps)]
        self.ctx.student.pull_state()
        return {"learner": "student", "steps": len(stats), "single_step_first": stats[0]["single_step"],
                "single_step_last": stats[-1]["single_step"], "reward_first": stats[0]["reward"],
                "reward_last": stats[-1]["reward"]}


def make(ctx: ModeContext) -> FLMiniLLM:
    return FLMiniLLM(ctx)
