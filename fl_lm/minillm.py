"""MiniLLM (Gu et al., ICLR 2024): distil a teacher p into a student q_θ by minimising the
*sequence-level* reverse KL, KL[q_θ‖p] = −E_{y~q_θ} Σ_t r_t, r_t = log p(y_t|y_<t,x) − log q_θ(y_t|y_<t,x).

Reverse KL is mode-seeking: the student learns to put its (small) capacity on what the teacher
finds likely instead of smearing mass over everything the teacher might say, which is what
token-level forward KD (``fl_lm.kd``) does. The gradient is split as in the paper:

- single-step term: the expectation over the next token is taken exactly over the vocabulary,
  i.e. the per-position KL(q_θ‖p) on the sampled prefixes (LMOps ``_reg_loss``), or on the K+1
  buckets of a teacher known only on a candidate set (a client returning its top-k);
- long-term term: a PPO-clipped policy gradient on the future return R_{t+1} = Σ_{s>t} γ^{s-t-1} r_s,
  optionally length-normalised (``--length-norm``) and whitened (LMOps ``_pg_loss``);
- teacher-mixed sampling: rollouts come from p̃ = α·p + (1−α)·q_θ, which keeps early, bad students
  on text the teacher can score (no reward hacking on degenerate samples); the per-token weight
  w_t = q_θ(y_t)/p̃(y_t) corrects the estimate back to the student's own distribution;
- plus ``lm_coef`` times the plain language-modelling loss on public text (the paper's L_PT).

Positions are *response* positions: for a rollout ``ids = [prompt (P) | response (N)]``,
``logits[:, n]`` is the model's distribution of response token ``n`` given the prompt and the
response tokens before it (``model(ids).logits[:, P-1+n]``); ``mask[:, n]`` says whether that token
counts (everything after the first eos is masked out, the eos itself counts).

What is reused: the installed TRL 1.16 ships no MiniLLM trainer or loss (TRL's docs had a MiniLLM
Trainer page around v0.27, but 1.16's ``experimental/`` has GKD, GOLD, IW-OPD, server distillation
and others, no ``minillm``), and its PPO pieces live inside trainers, not as functions. So the MiniLLM parts
(mixed sampling and its weights, rewards, returns, the weighted clipped PG term, the candidate
buckets) are written here. Two kept TRL functions fit as they are and are used:
``GKDTrainer.generalized_jsd_loss`` with beta = 1 is exactly the per-position reverse KL
(as ``fl_lm.kd`` uses it), and ``trl.trainer.utils.selective_log_softmax`` gathers per-token
log-probabilities (memory-light, fused on GPU). The LM term is ``fl_lm.kd.lm_loss``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

from fl_lm import kd
from shared.config import require

log = logging.getLogger(__name__)

_FLOOR = 1e-12  # smallest probability a bucket may have: log(0) would make the KL NaN, not large
_CLIP_NORM = 1.0  # gradient-norm clip of a step, as in MiniLLM and fl_lm.distil


class Rollout(NamedTuple):
    """Sampled continuations of a prompt batch."""

    ids: Any  # (B, P+N) long: prompts and responses
    mask: Any  # (B, N) bool: response tokens up to and including the first eos
    log_w: Any  # (B, N) float: log q(y_n) − log p̃(y_n); 0 where masked


# -- scoring ---------------------------------------------------------------------------------------

def token_logp(logits: Any, tokens: Any) -> Any:
    """log-softmax(logits) gathered at ``tokens``: (B, N, V), (B, N) -> (B, N)."""
    from trl.trainer.utils import selective_log_softmax

    return selective_log_softmax(logits.float(), tokens)


def response_logits(model: Any, ids: Any, prompt_len: int) -> Any:
    """The model's logits at the response positions of ``ids``: (B, P+N) -> (B, N, V), float32.

    The forward pass is autocast at the model's placement (``fl_lm.device``); ``ids`` must be on
    its device."""
    from fl_lm.device import of_model

    with of_model(model).autocast():
        logits = model(input_ids=ids).logits
    return logits[:, prompt_len - 1 : -1].float()


def _reverse_kl(student: Any, teacher: Any) -> Any:
    """Σ_v q (log q − log p) per position, from logits or log-probs on the last axis: (B, N)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    # beta = 1 is the reverse KL; TRL log-softmaxes both sides first, a no-op on log-probs.
    per = GKDTrainer.generalized_jsd_loss(student, teacher, labels=None, beta=1.0, temperature=1.0, reduction="none")
    return per.sum(-1)


def _masked_mean(x: Any, mask: Any) -> Any:
    m = mask.float()
    return (x * m).sum() / m.sum().clamp_min(1.0)


# -- teacher-mixed sampling ----------------------------------------------------------------------

def mixed_sample(student_logits: Any, teacher_logits: Any, alpha: float, generator: Any = None,
                 temperature: float = 1.0) -> tuple[Any, Any]:
    """One token per row from p̃ = α·p + (1−α)·q, and its log importance weight log q(y) − log p̃(y).

    Shapes: (..., V), (..., V) -> tokens (...) long, log_w (...) float. ``temperature`` sharpens or
    flattens both models in the *proposal* only; the weight always targets the untempered student,
    so E_{p̃}[w·f] = E_q[f] at any temperature (1.0 is MiniLLM's pure sampling, w then within
    [0, 1/(1−α)]). α < 1 keeps every token the student could emit inside the proposal's support.
    """
    import torch

    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    s, t = student_logits.float(), teacher_logits.float()
    lq_t = torch.log_softmax(s / temperature, -1)  # (..., V)
    lp_t = torch.log_softmax(t / temperature, -1)  # (..., V)
    a = torch.tensor(alpha, dtype=lq_t.dtype, device=lq_t.device)
    log_mix = torch.logaddexp(torch.log(a) + lp_t, torch.log1p(-a) + lq_t)  # (..., V); log(0) = -inf is fine here
    flat = log_mix.reshape(-1, log_mix.size(-1)).exp()  # (M, V)
    if generator is not None and generator.device != flat.device:
        # A seeded host generator drives the draw wherever the models run, so a seed gives the
        # same samples on a GPU as on the CPU (given the same probabilities).
        y = torch.multinomial(flat.cpu(), 1, generator=generator).to(flat.device)
    else:
        y = torch.multinomial(flat, 1, generator=generator)
    y = y.reshape(log_mix.shape[:-1])  # (...)
    lq = torch.log_softmax(s, -1).gather(-1, y[..., None])[..., 0]  # (...)
    return y, lq - log_mix.gather(-1, y[..., None])[..., 0]


def response_mask(tokens: Any, eos_id: int | None) -> Any:
    """(B, N) -> (B, N) bool: True up to and including each row's first eos."""
    import torch

    if eos_id is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    eos = (tokens == eos_id).long()
    return (eos.cumsum(-1) - eos) == 0  # no eos strictly before this position


def generate_mixed(student: Any, teacher: Any, prompt_ids: Any, max_new_tokens: int, alpha: float,
                   eos_id: int | None, generator: Any = None, temperature: float = 1.0) -> Rollout:
    """Sample responses to a batch of prompts from the teacher-mixed policy, token by token.

    ``prompt_ids`` (B, P) are prompts of one length without padding, so no attention mask or
    position ids are needed; both models must share the vocabulary. There is no KV cache: each new
    token is a full forward of both models, fine for short responses and tiny models, and it keeps
    this usable with any callable returning ``.logits``. Rows that emitted eos are padded with eos
    (masked out); sampling stops early when every row has. Runs without autograd, where the
    student was placed (``fl_lm.device``): ``prompt_ids`` go to its device, forwards are autocast.
    """
    import torch

    from fl_lm.device import of_model

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    s_pl, t_pl = of_model(student), of_model(teacher)
    ids = prompt_ids.to(s_pl.device)
    done = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)  # (B,)
    log_ws = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            with s_pl.autocast():
                s = student(input_ids=ids).logits[:, -1].float()  # (B, V)
            with t_pl.autocast():
                t = teacher(input_ids=ids).logits[:, -1].float() if alpha > 0 else s  # the teacher is not needed at α = 0
            y, lw = mixed_sample(s, t, alpha, generator, temperature)  # (B,), (B,)
            if eos_id is not None:
                y = torch.where(done, torch.full_like(y, eos_id), y)
                done = done | (y == eos_id)
            log_ws.append(lw)
            ids = torch.cat([ids, y[:, None]], dim=1)  # (B, P+n+1)
            if bool(done.all()):
                break
    mask = response_mask(ids[:, prompt_ids.size(1) :], eos_id)  # (B, N)
    log_w = torch.stack(log_ws, dim=1) * mask  # (B, N)
    return Rollout(ids=ids, mask=mask, log_w=log_w)


# -- the two gradient terms -------------------------------------------------------------------------

def token_rewards(teacher_logp_tokens: Any, student_logp_tokens: Any, mask: Any) -> Any:
    """r_t = log p(y_t|·) − log q(y_t|·) (LMOps: teacher reward plus the entropy reward −log q): (B, N)."""
    return (teacher_logp_tokens - student_logp_tokens) * mask.float()


def single_step_term(student_logits: Any, teacher_logits: Any, mask: Any) -> Any:
    """Exact per-position KL(q‖p) over the vocabulary, mean over response tokens: a scalar.

    (B, N, V), (B, N, V), (B, N). This is −E_{y_t~q} r_t taken in closed form instead of from one
    sample, the low-variance half of the gradient; the teacher is a constant.
    """
    return _masked_mean(_reverse_kl(student_logits.float(), teacher_logits.float().detach()), mask)


def single_step_term_candidates(student_logits: Any, cand_ids: Any, teacher_cand_probs: Any,
                                teacher_rest_mass: Any, mask: Any) -> Any:
    """KL(q‖p) on K+1 buckets, for a teacher known only on K candidate ids per position.

    student_logits (B, N, V), cand_ids (B, N, K) long (distinct per position), teacher_cand_probs
    (B, N, K), teacher_rest_mass (B, N): the teacher's mass outside the candidates. The student is
    collapsed onto the same buckets (its probabilities on the candidates, and the rest), so the
    divergence is the exact one between the two coarsened distributions: what a client that returns
    only its top-k can support, and equal to ``single_step_term`` when K = V. Teacher buckets are
    renormalised (TRL's log-softmax), so wire-rounded probabilities that sum to 1 ± ε are fine.
    """
    import torch

    s = token_logp(student_logits, cand_ids)  # (B, N, K)
    s_rest = torch.log((1.0 - s.exp().sum(-1, keepdim=True)).clamp_min(_FLOOR))  # (B, N, 1)
    t = torch.cat([teacher_cand_probs.float(), teacher_rest_mass.float()[..., None]], dim=-1).detach()  # (B, N, K+1)
    kl = _reverse_kl(torch.cat([s, s_rest], dim=-1), torch.log(t.clamp_min(_FLOOR)))  # (B, N)
    return _masked_mean(kl, mask)


def returns(rewards: Any, mask: Any, gamma: float, length_norm: bool = True) -> Any:
    """Future returns R_{t+1} = Σ_{s>t} γ^{s−t−1} r_s per position: (B, N) -> (B, N).

    With ``length_norm`` (MiniLLM ``--length-norm``) each is divided by the number of response
    tokens it sums over, so a long response does not get a larger return just for being long, which
    would otherwise bias the student towards short (or long) answers. Masked rewards do not count.
    """
    import torch

    m = mask.float()
    r = rewards * m  # (B, N)
    run = torch.zeros_like(r[:, 0])  # (B,)
    out = []
    for t in reversed(range(r.size(1))):
        out.append(run)  # Σ_{s>t}: the reward at t itself is the single-step term's
        run = r[:, t] + gamma * run
    ret = torch.stack(out[::-1], dim=1)  # (B, N)
    if length_norm:
        after = m.flip(-1).cumsum(-1).flip(-1) - m  # (B, N): response tokens after t
        ret = ret / after.clamp_min(1.0)
    return ret * m


def whiten(x: Any, mask: Any) -> Any:
    """Zero mean, unit variance over the response tokens of the batch (MiniLLM's advantages): (B, N)."""
    import torch

    m = mask.float()
    n = m.sum().clamp_min(1.0)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + 1e-8) * m  # eps: all-equal advantages give 0, not NaN


def pg_term(student_logp_tokens: Any, old_logp_tokens: Any, log_w: Any, advantages: Any, mask: Any,
            clip: float = 0.2) -> Any:
    """PPO-clipped policy gradient of the long-term term, a scalar to minimise. All inputs (B, N).

    As in MiniLLM's ``_pg_loss`` the importance weight of teacher-mixed sampling multiplies the
    ratio *before* clipping, so the clip also bounds w·ratio: it caps the variance the mixed
    proposal adds, at the price that a token whose w is outside [1−clip, 1+clip] only gets the
    gradient that moves w·ratio back towards the band. Only ``student_logp_tokens`` carries gradient.
    """
    import torch

    m = mask.float()
    ratio = torch.exp((student_logp_tokens - old_logp_tokens.detach()) * m) * torch.exp(log_w.detach())  # (B, N)
    a = advantages.detach()
    loss = torch.max(-a * ratio, -a * ratio.clamp(1.0 - clip, 1.0 + clip))  # (B, N)
    return _masked_mean(loss, mask)


def minillm_loss(student_logits: Any, teacher_logits: Any, tokens: Any, mask: Any, old_logp: Any, log_w: Any,
                 advantages: Any, clip: float = 0.2, lm_coef: float = 1.0, lm_logits: Any = None,
                 lm_labels: Any = None) -> tuple[Any, dict[str, float]]:
    """single-step term + PG term (+ ``lm_coef`` · LM loss when ``lm_logits`` is given): (loss, stats).

    Rollout tensors are at response positions: logits (B, N, V), the rest (B, N). ``lm_logits``
    (B', T, V) and ``lm_labels`` (B', T) are at target positions (``kd`` convention: the caller
    passes ``logits[:, :-1]`` and ``labels[:, 1:]``), with -100 where nothing is learnt.
    """
    import torch

    single = single_step_term(student_logits, teacher_logits, mask)
    pg = pg_term(token_logp(student_logits, tokens), old_logp, log_w, advantages, mask, clip)
    loss = single + pg
    lm = torch.zeros(())
    if lm_logits is not None:
        lm = kd.lm_loss(lm_logits, lm_labels)
        loss = loss + lm_coef * lm
    w = torch.exp(log_w.detach())
    stats = {"loss": float(loss.detach()), "single_step": float(single.detach()), "pg": float(pg.detach()),
             "lm": float(lm.detach()), "w": float(_masked_mean(w, mask))}
    return loss, stats


def reverse_kl_estimate(student: Any, teacher: Any, prompt_ids: Any, max_new_tokens: int, eos_id: int | None,
                        generator: Any = None) -> float:
    """Sequence-level KL[q‖p] (nats per response), estimated on responses sampled from the student.

    Uses Σ_t KL(q_t‖p_t) along each sampled prefix instead of Σ_t log q(y_t) − log p(y_t): by the
    chain rule both have the sequence KL (of responses cut at ``max_new_tokens``) as expectation,
    but the exact per-position inner sum has far lower variance, so a fixed prompt set and seed
    give a stable number to compare before and after training.
    """
    import torch

    with torch.no_grad():
        roll = generate_mixed(student, teacher, prompt_ids, max_new_tokens, 0.0, eos_id, generator)
        p_len = prompt_ids.size(1)
        kl = _reverse_kl(response_logits(student, roll.ids, p_len), response_logits(teacher, roll.ids, p_len))  # (B, N)
        return float((kl * roll.mask.float()).sum(-1).mean())


# -- one training step --------------------------------------------------------------------------

@dataclass(frozen=True)
class MiniLLMSettings:
    """One MiniLLM update: sampling, returns and loss weights (the learning rate is the optimizer's)."""

    alpha: float = 0.2  # teacher share of the sampling mix (--teacher-mixed-alpha 0.2); < 1 so q stays in the support
    gamma: float = 0.95  # discount of future rewards (MiniLLM arguments.py)
    clip: float = 0.2  # PPO clip range on w·ratio (--cliprange)
    max_new_tokens: int = 64  # each is a full forward of both models (no KV cache): keep responses short
    lm_coef: float = 1.0  # the paper's L = L_RKL + L_PT: LM loss on public text with equal weight
    temperature: float = 1.0  # of the proposal only; 1.0 is MiniLLM's pure sampling (top-k 0, top-p 1)
    length_norm: bool = True  # --length-norm: returns per remaining token, no bias towards short answers
    whiten: bool = True  # advantages whitened over the batch, as MiniLLM does
    # Updates per rollout batch (MiniLLM: 4 PPO epochs). Scoring a rollout needs the teacher, the
    # costly part when it sits elsewhere in the federation, so each is reused; the clip keeps the
    # later epochs near the sampling policy.
    ppo_epochs: int = 4

    def __post_init__(self) -> None:
        require(0.0 <= self.alpha < 1.0, f"alpha must be in [0, 1), got {self.alpha}")
        require(0.0 <= self.gamma <= 1.0, f"gamma must be in [0, 1], got {self.gamma}")
        require(0.0 < self.clip < 1.0, f"clip must be in (0, 1), got {self.clip}")
        require(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
                f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        require(self.lm_coef >= 0.0, f"lm_coef must be >= 0, got {self.lm_coef}")
        require(self.temperature > 0.0, f"temperature must be > 0, got {self.temperature}")
        require(isinstance(self.ppo_epochs, int) and self.ppo_epochs >= 1, f"ppo_epochs must be an int >= 1, got {self.ppo_epochs!r}")
        require(isinstance(self.length_norm, bool) and isinstance(self.whiten, bool), "length_norm and whiten must be bools")


def minillm_step(student: Any, teacher: Any, optimizer: Any, prompt_ids: Any, lm_batch: dict[str, Any] | None,
                 settings: MiniLLMSettings, eos_id: int | None = None, generator: Any = None) -> dict[str, float]:
    """Sample one rollout batch, score it, and run ``settings.ppo_epochs`` updates of the student.

    ``lm_batch`` is a ``fl_lm.data.collate`` batch of public text (``input_ids``, ``attention_mask``,
    ``labels``) for the LM term; it is required when ``lm_coef > 0``. Rewards, returns and the old
    log-probabilities come from the student as it sampled (eval mode, no autograd) and stay fixed
    across the epochs. Returns the last epoch's stats plus the rollout's mean reward and length.
    """
    import torch

    from fl_lm.device import Stepper, of_model

    s = settings
    if s.lm_coef > 0 and lm_batch is None:
        raise ValueError("lm_coef > 0 needs an lm_batch of public text")
    pl = of_model(student)
    prompt_ids = prompt_ids.to(pl.device)
    lm_batch = pl.put(lm_batch) if lm_batch is not None else None
    p_len = prompt_ids.size(1)
    teacher.eval()
    student.eval()
    roll = generate_mixed(student, teacher, prompt_ids, s.max_new_tokens, s.alpha, eos_id, generator, s.temperature)
    tokens = roll.ids[:, p_len:]  # (B, N)
    with torch.no_grad():
        t_logits = response_logits(teacher, roll.ids, p_len)  # (B, N, V)
        old_logp = token_logp(response_logits(student, roll.ids, p_len), tokens)  # (B, N)
        rewards = token_rewards(token_logp(t_logits, tokens), old_logp, roll.mask)  # (B, N)
        adv = returns(rewards, roll.mask, s.gamma, s.length_norm)
        if s.whiten:
            adv = whiten(adv, roll.mask)
    params = [p for p in student.parameters() if p.requires_grad]
    step = Stepper(pl, params, optimizer, max_norm=_CLIP_NORM)
    student.train()
    stats: dict[str, float] = {}
    for _ in range(s.ppo_epochs):
        lm_logits = lm_labels = None
        if lm_batch is not None and s.lm_coef > 0:
            with pl.autocast():
                out = student(input_ids=lm_batch["input_ids"], attention_mask=lm_batch.get("attention_mask")).logits
            lm_logits, lm_labels = out[:, :-1], lm_batch["labels"][:, 1:]
        loss, stats = minillm_loss(response_logits(student, roll.ids, p_len), t_logits, tokens, roll.mask, old_logp,
                                   roll.log_w, adv, s.clip, s.lm_coef, lm_logits, lm_labels)
        optimizer.zero_grad(set_to_none=True)
        step(loss)
    optimizer.zero_grad(set_to_none=True)
    student.eval()
    m = roll.mask.float()
    stats["reward"] = float(rewards.sum() / m.sum().clamp_min(1.0))
    stats["tokens"] = float(m.sum(-1).mean())
    log.debug("minillm step: %s", stats)
    return stats
