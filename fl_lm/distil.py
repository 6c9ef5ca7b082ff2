"""Teacher-forced, token-level distillation of one model (the learner) from another (the guide) on
public examples: the training loop both directions of mutual distillation use.

Teacher to student: the learner is the student, the guide the teacher; student to teacher: the
other way round. With ``selective`` (FedMKT's DualMinCE, "greater"), each sample's KD target
comes from whichever side fits that sample's reference better (lower negative log-likelihood of
the response): the guide's distribution where the guide is better, and otherwise the learner's
own distribution as it was when the phase began (a frozen snapshot), which anchors what the
learner already does well instead of letting the phase wash it out. The LM term always counts. When the two tokenizers differ, the guide's
top-k distribution at each position is carried over to the learner's vocabulary through the
MinED map and the DTW alignment of the two tokenizations (``fl_lm.align``); positions without a
one-to-one match get a one-hot target on the learner's own token.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl_lm import kd
from fl_lm.data import IGNORE, encode_example
from shared.config import require
from shared.datasets import Example

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KDSettings:
    kind: str = "forward_kl"  # forward_kl, reverse_kl or jsd (TRL's generalized JSD)
    beta: float = 0.5  # jsd only: 0 would be forward KL, 1 reverse KL
    temperature: float = 1.0
    top_k: int = 32  # teacher distribution truncated to its top k, the rest one bucket; 0 = full vocabulary
    kd_alpha: float = 0.5  # weight of the LM loss; 1 - kd_alpha on the KD term (FedMKT's kd_alpha)
    steps: int = 40
    lr: float = 3e-3
    batch_size: int = 16
    max_len: int = 128
    selective: bool = True  # DualMinCE: learn from the guide only on samples it fits better
    # Draw every family of the public set equally often, so a few big families do not pull the
    # learner away from what the small ones (e.g. a public slice of the fleet's tasks) hold.
    balance_families: bool = True

    def __post_init__(self) -> None:
        require(self.kind in kd.KINDS, f"kd loss must be one of {kd.KINDS}, got {self.kind!r}")
        require(self.kind != "jsd" or 0.0 < self.beta < 1.0, f"jsd beta must be in (0, 1), got {self.beta}")
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        require(0.0 <= self.kd_alpha <= 1.0, f"kd_alpha must be in [0, 1], got {self.kd_alpha}")
        require(self.steps >= 0 and self.batch_size >= 1 and self.lr > 0, "steps >= 0, batch_size >= 1 and lr > 0 are required")


@dataclass(frozen=True)
class PhaseStats:
    """One distillation phase, for the round record."""

    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    kd_first: float
    kd_last: float
    from_guide: float  # share of samples whose KD term was on (DualMinCE picked the guide)


@dataclass(frozen=True)
class _Pair:
    """One public example tokenized for both models, with the learner->guide position map."""

    ids: list[int]
    labels: list[int]
    g_ids: list[int]
    g_labels: list[int]
    l2g: np.ndarray | None  # learner target position -> guide target position, or -1; None: same tokenizer


class Distiller:
    """Prepared once per (learner, guide) tokenizer pair and public set; ``run`` trains the learner."""

    def __init__(self, learner_tok: Any, guide_tok: Any, examples: list[Example], max_len: int, cache_dir: str | Path | None = None) -> None:
        from fl_lm import align

        if not examples:
            raise ValueError("no public examples to distil on")
        self.learner_tok, self.guide_tok = learner_tok, guide_tok
        self.same = align.vocab_digest(learner_tok) == align.vocab_digest(guide_tok)
        self.g2l: Any = None
        t0 = time.monotonic()
        if not self.same:
            ls, gs = align.surfaces(learner_tok), align.surfaces(guide_tok)
            m = align.cached_map(guide_tok, learner_tok, cache_dir)
            l2g_vocab = align.cached_map(learner_tok, guide_tok, cache_dir)
            import torch

            self.g2l = torch.as_tensor(m, dtype=torch.long)
        self.pairs: list[_Pair] = []
        self.families: dict[str, list[int]] = {}
        for i, e in enumerate(examples):
            self.families.setdefault(e.family, []).append(i)
        for e in examples:
            ids, labels = encode_example(learner_tok, e, max_len)
            if self.same:
                self.pairs.append(_Pair(ids, labels, ids, labels, None))
                continue
            g_ids, g_labels = encode_example(guide_tok, e, max_len)
            pos = align.one_to_one([ls[i] for i in ids], [gs[i] for i in g_ids], ids, g_ids, l2g_vocab)
            self.pairs.append(_Pair(ids, labels, g_ids, g_labels, pos))
        if not self.same:
            aligned = sum(int((p.l2g[1:] >= 1).sum()) for p in self.pairs if p.l2g is not None)
            total = sum(len(p.ids) - 1 for p in self.pairs)
            log.info("cross-tokenizer alignment: %d of %d target positions align one-to-one (%.1fs)",
                     aligned, total, time.monotonic() - t0)

    # -- batches -------------------------------------------------------------------------------
    def _collate(self, pairs: list[_Pair]) -> dict[str, Any]:
        import torch

        def pad(seqs: list[list[int]], value: int) -> Any:
            w = max(len(s) for s in seqs)
            out = torch.full((len(seqs), w), value, dtype=torch.long)
            for i, s in enumerate(seqs):
                out[i, : len(s)] = torch.tensor(s)
            return out

        lp, gp = self.learner_tok.pad_token_id, self.guide_tok.pad_token_id
        ids, g_ids = pad([p.ids for p in pairs], lp), pad([p.g_ids for p in pairs], gp)
        batch = {"ids": ids, "mask": (pad([[1] * len(p.ids) for p in pairs], 0)), "labels": pad([p.labels for p in pairs], IGNORE),
                 "g_ids": g_ids, "g_mask": pad([[1] * len(p.g_ids) for p in pairs], 0), "g_labels": pad([p.g_labels for p in pairs], IGNORE)}
        if not self.same:
            # learner target position t (predicting token t+1) <- guide logits at (aligned token - 1)
            w = ids.size(1) - 1
            pos = torch.full((len(pairs), w), -1, dtype=torch.long)
            for i, p in enumerate(pairs):
                assert p.l2g is not None
                j = torch.as_tensor(p.l2g[1:], dtype=torch.long)  # (L-1,): guide token aligned to learner token t+1
                pos[i, : len(j)] = torch.where(j >= 1, j - 1, torch.full_like(j, -1))
            batch["pos"] = pos
        return batch

    def _target(self, g_logits: Any, batch: dict[str, Any], s: KDSettings) -> kd.Target:
        """The guide's distribution on the learner's vocabulary, per learner target position."""
        import torch

        if self.same:
            return kd.topk_target(g_logits[:, :-1], s.top_k, s.temperature)
        pos = batch["pos"]  # (B, T)
        labels = batch["labels"][:, 1:]  # (B, T)
        v_l = len(self.learner_tok)
        b, t = pos.shape
        picked = g_logits.gather(1, pos.clamp_min(0)[:, :, None].expand(b, t, g_logits.size(-1)))  # (B, T, Vg)
        k = s.top_k if 0 < s.top_k < picked.size(-1) else picked.size(-1)
        val, gid = (picked.float() / s.temperature).topk(k, dim=-1)  # (B, T, K)
        probs = torch.softmax(val, dim=-1)  # FedMKT: softmax over the kept top-k
        if self.g2l.device != gid.device:
            self.g2l = self.g2l.to(gid.device)  # once: the map follows the models to their device
        dense = torch.zeros((b, t, v_l), dtype=torch.float32, device=probs.device)
        dense.scatter_add_(-1, self.g2l[gid], probs)  # (B, T, Vl): ids mapped, duplicates merged
        onehot = torch.zeros_like(dense).scatter_(-1, labels.clamp_min(0)[:, :, None], 1.0)
        dense = torch.where((pos >= 0)[:, :, None], dense, onehot)
        kk = min(k, v_l)
        p, idx = dense.topk(kk, dim=-1)  # (B, T, K)
        logp = torch.where(p > 0, torch.log(p.clamp_min(1e-30)), torch.full_like(p, kd.NEG))
        return kd.Target(idx=idx, logp=logp)

    # -- training ------------------------------------------------------------------------------
    def targets(self, guide: Any, anchor: Any, batch: dict[str, Any], s: KDSettings) -> tuple[kd.Target, Any]:
        """Each sample's KD target and whether it came from the guide: (Target, (B,) float 0/1).

        With an ``anchor`` (selective), a sample takes the guide's distribution only where the
        guide's negative log-likelihood of the reference is lower than the anchor's; otherwise
        the anchor's own (top-k truncated the same way). Without one, always the guide's.
        """
        import torch

        from fl_lm.device import of_model

        g_pl = of_model(guide)
        with torch.no_grad():
            with g_pl.autocast():
                g_logits = guide(input_ids=batch["g_ids"], attention_mask=batch["g_mask"]).logits
            g_logits = g_logits.float()  # (B, Tg, Vg)
            g_nll = kd.sample_ce(g_logits[:, :-1], batch["g_labels"][:, 1:]) * _n_resp(batch["g_labels"])  # (B,)
            target = self._target(g_logits, batch, s)
            if anchor is None:
                return target, torch.ones(batch["ids"].size(0), device=batch["ids"].device)
            lab = batch["labels"][:, 1:]
            with of_model(anchor).autocast():
                a_logits = anchor(input_ids=batch["ids"], attention_mask=batch["mask"]).logits
            a_logits = a_logits.float()[:, :-1]  # (B, T, V)
            a_nll = kd.sample_ce(a_logits, lab) * _n_resp(batch["labels"])  # (B,)
            w = kd.select_other(a_nll, g_nll).float()  # (B,)
            own = kd.topk_target(a_logits, target.idx.size(-1), s.temperature)
            pick = w.bool()[:, None, None]  # (B, 1, 1)
            return kd.Target(idx=torch.where(pick, target.idx, own.idx), logp=torch.where(pick, target.logp, own.logp)), w

    def run(self, learner: Any, guide: Any, s: KDSettings, seed: int) -> PhaseStats:
        """``s.steps`` AdamW steps on the learner's trainable (LoRA) weights; the guide is frozen.

        Both run where they were placed (``fl_lm.device``; the same device, as the aggregator
        places them): batches go there, forward passes are autocast, the losses are float32.
        """
        import copy

        import torch

        from fl_lm.device import Stepper, of_model

        t0 = time.monotonic()
        params = [p for p in learner.parameters() if p.requires_grad]
        if s.steps == 0 or not params:
            return PhaseStats(0, 0.0, float("nan"), float("nan"), float("nan"), float("nan"), 0.0)
        pl = of_model(learner)
        # The learner as the phase found it: the self-target of samples it fits better than the guide.
        anchor = copy.deepcopy(learner).eval() if s.selective else None
        opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
        step = Stepper(pl, params, opt, max_norm=1.0)
        rng = random.Random(seed)
        order: list[int] = []
        losses: list[float] = []
        kds: list[float] = []
        picked = total = 0
        guide.eval()
        fams = sorted(self.families)
        for _ in range(s.steps):
            if s.balance_families:
                chosen = [rng.choice(self.families[rng.choice(fams)]) for _ in range(s.batch_size)]
            else:
                if len(order) < s.batch_size:
                    more = list(range(len(self.pairs)))
                    rng.shuffle(more)
                    order += more * max(1, -(-s.batch_size // len(more)))
                chosen, order = order[: s.batch_size], order[s.batch_size :]
            batch = pl.put(self._collate([self.pairs[i] for i in chosen]))
            target, w = self.targets(guide, anchor, batch, s)
            learner.train()
            with pl.autocast():
                logits = learner(input_ids=batch["ids"], attention_mask=batch["mask"]).logits  # (B, T, Vl)
            lg, lab = logits[:, :-1], batch["labels"][:, 1:]
            lm = kd.lm_loss(lg, lab)  # the losses upcast to float32 themselves
            kdl = kd.kd_loss(lg, target, lab, s.kind, s.beta, s.temperature)
            loss = kd.mixed(lm, kdl, s.kd_alpha)
            step(loss)
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            kds.append(float(kdl.detach()))
            picked += int(w.sum())
            total += len(chosen)
        learner.eval()
        head = max(1, min(5, len(losses) // 2))  # first and last are different steps, also in a short phase
        return PhaseStats(steps=len(losses), seconds=round(time.monotonic() - t0, 3),
                          first_loss=float(np.mean(losses[:head])), last_loss=float(np.mean(losses[-head:])),
                          kd_first=float(np.mean(kds[:head])), kd_last=float(np.mean(kds[-head:])),
                          from_guide=picked / max(1, total))


def _n_resp(labels: Any) -> Any:
    return (labels[:, 1:] != IGNORE).sum(-1).float()  # (B,)
