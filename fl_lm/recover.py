"""Recovery of a depth-pruned student: token-level distillation from the unpruned teacher on public
data before round 1, and the held-out figures that show what it bought.

Full fine-tuning, not LoRA: it runs once in the cloud, where memory is not the limit, and the
pruned student has lost general ability that a low-rank update recovers less of. The loss is
the project's (``fl_lm.kd``): forward KL to the teacher's top-k distribution (with the rest as one
bucket), as Minitron retrains pruned models with distillation alone (``kd_alpha`` 0); a share of
the reference answers' LM loss can be mixed in. KD counts on every real token, prompt included,
because the student lost more than answering and the teacher's forward pass gave those
positions for free; the LM term, like all training here, counts on the answer only.

Tensors go to the device the model's parameters are on, so a device policy placing the models
needs no change here.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from fl_lm import kd
from fl_lm.data import IGNORE, batches, collate, encode_example
from shared.config import require
from shared.datasets import Example

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoverySettings:
    # Still falling at 100 steps (the 10-of-30-layer SmolLM2 copy: held-out perplexity 6992 -> 71,
    # teacher 7.2), so more helps; 200 is a quarter of an hour at ~4 s a step on 2 idle cores.
    steps: int = 200
    batch_size: int = 4
    max_len: int = 256  # Alpaca answers through the chat template: most fit; longer ones keep their start
    # Measured on the 10-of-30-layer SmolLM2 copy, 40 steps of 4 x 128 tokens: held-out perplexity
    # 7161 -> 120 at 3e-4, -> 191 at 1e-4. A pruned model is far from any minimum; it takes the larger step.
    lr: float = 3e-4
    warmup: int = 10  # linear warm-up steps, then cosine decay to a tenth of lr
    kind: str = "forward_kl"
    temperature: float = 1.0
    top_k: int = 32  # the project's KD default: the teacher's top 32 and a rest bucket
    kd_alpha: float = 0.0  # weight of the LM loss on reference answers; 0 = distillation alone (Minitron)
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        require(self.steps >= 0, f"recovery steps must be >= 0, got {self.steps}")
        require(self.batch_size >= 1 and self.eval_batch_size >= 1, f"batch sizes must be >= 1, got {self.batch_size}")
        require(self.max_len >= 8, f"max_len must be >= 8 tokens, got {self.max_len}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        require(self.kind in kd.KINDS, f"kd loss must be one of {kd.KINDS}, got {self.kind!r}")
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        require(0.0 <= self.kd_alpha <= 1.0, f"kd_alpha must be in [0, 1], got {self.kd_alpha}")


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _to(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}


def _step_losses(student: Any, teacher: Any, batch: dict[str, Any], s: RecoverySettings) -> tuple[Any, Any]:
    """(loss to minimise, KD term) for one batch; the teacher is frozen."""
    import torch

    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids.to(_device(teacher)), attention_mask=mask.to(_device(teacher))).logits[:, :-1]  # (B, T, V)
        t = kd.topk_target(t_logits, s.top_k, s.temperature)
        target = kd.Target(idx=t.idx.to(ids.device), logp=t.logp.to(ids.device))
    logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T, V)
    every = torch.where(mask[:, 1:].bool(), ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE))  # (B, T): all real tokens
    kdl = kd.kd_loss(logits, target, every, s.kind, temperature=s.temperature)
    if s.kd_alpha == 0.0:
        return kdl, kdl
    return kd.mixed(kd.lm_loss(logits, batch["labels"][:, 1:]), kdl, s.kd_alpha), kdl


def recover(student: Any, teacher: Any, tok: Any, train: list[Example], s: RecoverySettings, seed: int = 0) -> dict[str, Any]:
    """``s.steps`` AdamW steps on every student weight; returns the figures for the model card."""
    import torch

    if s.steps == 0:
        return {"steps": 0}
    device = _device(student)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < s.warmup:
            return (step + 1) / s.warmup
        frac = (step - s.warmup) / max(1, s.steps - s.warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    teacher.eval()
    student.train()
    losses: list[float] = []
    t0 = time.monotonic()
    for step, batch in enumerate(batches(tok, train, s.batch_size, s.max_len, seed, s.steps)):
        loss, _ = _step_losses(student, teacher, _to(batch, device), s)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % 10 == 0 or step + 1 == s.steps:
            el = time.monotonic() - t0
            log.info("recovery step %d/%d loss %.3f (%.2f steps/s, %.0fs left)", step + 1, s.steps,
                     sum(losses[-10:]) / len(losses[-10:]), (step + 1) / el, el / (step + 1) * (s.steps - step - 1))
    student.eval()
    seconds = time.monotonic() - t0
    head = max(1, min(10, len(losses) // 4))
    return {**asdict(s), "method": "full fine-tuning, distillation from the unpruned model",
            "loss_first": sum(losses[:head]) / head, "loss_last": sum(losses[-head:]) / head,
            "seconds": round(seconds, 1), "steps_per_s": round(len(losses) / seconds, 4)}


@dataclass(frozen=True)
class HeldOut:
    """Held-out public examples, encoded once, with the teacher's targets and perplexity on them."""

    batches: list[dict[str, Any]]
    targets: list[kd.Target]
    teacher_ppl: float


def held_out(teacher: Any, tok: Any, examples: list[Example], s: RecoverySettings) -> HeldOut:
    enc = [encode_example(tok, e, s.max_len) for e in examples]
    bs = [collate(tok, enc[i : i + s.eval_batch_size]) for i in range(0, len(enc), s.eval_batch_size)]
    targets: list[kd.Target] = []
    ppl, _ = _scores(teacher, bs, None, s, keep_targets=targets)
    return HeldOut(bs, targets, ppl)


def held_out_scores(model: Any, h: HeldOut, s: RecoverySettings) -> dict[str, float]:
    """Perplexity of the reference answers and mean KD divergence from the teacher, in one pass."""
    ppl, div = _scores(model, h.batches, h.targets, s)
    return {"ppl": ppl, "kd": div}


def _scores(model: Any, bs: list[dict[str, Any]], targets: list[kd.Target] | None, s: RecoverySettings,
            keep_targets: list[kd.Target] | None = None) -> tuple[float, float]:
    """(perplexity: exp of the token-mean CE of the answers, teacher-forced; KD on every real token
    as in training, or nan without ``targets``). ``keep_targets`` collects the model's own top-k."""
    import torch

    dev = _device(model)
    model.eval()
    ce = div = 0.0
    n_ans = n_all = 0
    with torch.no_grad():
        for j, b in enumerate(bs):
            b = _to(b, dev)
            ids, mask = b["input_ids"], b["attention_mask"]
            lg = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T, V)
            lab = b["labels"][:, 1:]
            ce += float(torch.nn.functional.cross_entropy(lg.float().transpose(1, 2), lab, ignore_index=IGNORE, reduction="sum"))
            n_ans += int((lab != IGNORE).sum())
            if keep_targets is not None:
                t = kd.topk_target(lg, s.top_k, s.temperature)
                keep_targets.append(kd.Target(idx=t.idx.cpu(), logp=t.logp.cpu()))
            if targets is not None:
                every = torch.where(mask[:, 1:].bool(), ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE))  # (B, T)
                k = int((every != IGNORE).sum())
                target = kd.Target(idx=targets[j].idx.to(dev), logp=targets[j].logp.to(dev))
                div += float(kd.kd_loss(lg, target, every, s.kind, temperature=s.temperature)) * k
                n_all += k
    return math.exp(ce / max(1, n_ans)), (div / max(1, n_all) if targets is not None else math.nan)
