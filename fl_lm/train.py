"""Local LoRA training: the only place a device's private examples touch the model.

A run can be snapshotted after any step (``TrainState``) and continued from the snapshot in a new
process: the trainable parameters, AdamW's moments and step counts, torch's generator states and
the losses so far are all that the remaining steps depend on (the batches are drawn again from
their seed and the consumed ones skipped), so a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fl_lm.data import batches
from shared.datasets import Example

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    mean_loss: float
    first_loss: float
    last_loss: float
    resumed_from: int = 0  # the step a resumed run continued from (0: it ran from the start)


@dataclass(frozen=True)
class TrainState:
    """A local run after ``step`` steps. Tensors are torch CPU tensors, so any dtype survives.

    params: the trainable parameters (the LoRA adapter) by ``named_parameters`` name.
    moments: AdamW's per-parameter tensors, named ``KEY/PARAM`` (``exp_avg/...``, ``exp_avg_sq/...``).
    counts: AdamW's step count per parameter name (its bias correction depends on it).
    rng: torch's generator states as uint8 tensors, ``cpu`` and ``cuda:I`` (dropout draws from them).
    losses: the loss of every step so far, so the resumed result reports the whole run.
    """

    step: int
    params: dict[str, Any]
    moments: dict[str, Any]
    counts: dict[str, float]
    rng: dict[str, Any]
    losses: tuple[float, ...]


# Called after each step but the last with (steps done, a function that takes the snapshot): the
# caller decides how often a snapshot is worth its copy and its write.
AfterStep = Callable[[int, Callable[[], TrainState]], None]


def _snapshot(named: list[tuple[str, Any]], opt: Any, losses: list[float]) -> TrainState:
    import torch

    name_of = {id(p): n for n, p in named}
    moments: dict[str, Any] = {}
    counts: dict[str, float] = {}
    for p, st in opt.state.items():
        for key, v in st.items():
            if key == "step":
                counts[name_of[id(p)]] = float(v)
            else:
                moments[f"{key}/{name_of[id(p)]}"] = v.detach().to("cpu", copy=True)
    rng = {"cpu": torch.get_rng_state()}
    if any(p.is_cuda for _, p in named):
        rng.update({f"cuda:{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return TrainState(step=len(losses), params={n: p.detach().to("cpu", copy=True) for n, p in named},
                      moments=moments, counts=counts, rng=rng, losses=tuple(losses))


def _mismatch(named: list[tuple[str, Any]], st: TrainState, steps: int) -> str:
    """Why ``st`` cannot continue this run ("" when it can); checked before anything is changed."""
    shapes = {n: (tuple(p.shape), p.dtype) for n, p in named}
    if not 0 < st.step < steps or len(st.losses) != st.step:
        return f"it is at step {st.step} ({len(st.losses)} losses) of a {steps}-step run"
    got = {n: (tuple(t.shape), t.dtype) for n, t in st.params.items()}
    if got != shapes:
        return f"its {len(got)} parameters differ from the adapter's {len(shapes)} in names, shapes or dtypes"
    for key, t in st.moments.items():
        if shapes.get(key.partition("/")[2]) != (tuple(t.shape), t.dtype):
            return f"optimizer state {key!r} fits no parameter"
    if not set(st.counts) <= set(shapes):
        return "optimizer step counts name unknown parameters"
    if "cpu" not in st.rng:
        return "it has no generator state"
    return ""


def _restore(named: list[tuple[str, Any]], opt: Any, st: TrainState) -> None:
    import torch

    with torch.no_grad():
        for n, p in named:
            p.copy_(st.params[n])
    sd = opt.state_dict()  # its param_groups: this run's hyperparameters, parameters numbered in order
    state: dict[int, dict[str, Any]] = {}
    for i, (n, _) in enumerate(named):
        s = {key.partition("/")[0]: t for key, t in st.moments.items() if key.partition("/")[2] == n}
        if n in st.counts:
            s["step"] = torch.tensor(st.counts[n], dtype=torch.float32)  # AdamW keeps it as a float32 scalar
        if s:
            state[i] = s
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    torch.set_rng_state(st.rng["cpu"])
    cuda = sorted((int(k.partition(":")[2]), v) for k, v in st.rng.items() if k.startswith("cuda:"))
    if cuda:
        torch.cuda.set_rng_state_all([v for _, v in cuda])


def train_lora(peft_model: Any, tok: Any, examples: list[Example], *, steps: int, lr: float, batch_size: int, max_len: int,
               seed: int, resume: TrainState | None = None, after_step: AfterStep | None = None) -> TrainResult:
    """AdamW on the adapter only (the base stays frozen), fresh optimizer each round as in FedIT.

    ``resume``: continue from that snapshot of this run (same model, examples and arguments)
    instead of from step 0; one that does not fit is ignored with a warning. ``after_step``: see
    ``AfterStep``.

    Runs where the model was placed (``fl_lm.device``): batches go to its device and forward
    passes are autocast at its dtype, while the adapter and AdamW's state stay float32.
    """
    import torch

    from fl_lm.device import Stepper, of_model

    torch.manual_seed(seed)
    pl = of_model(peft_model)
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    step = Stepper(pl, params, opt, max_norm=1.0)
    losses: list[float] = []
    resumed_from = 0
    if resume is not None:
        why = _mismatch(named, resume, steps)
        if why:
            log.warning("not resuming local training from its checkpoint: %s; starting from step 0", why)
        else:
            _restore(named, opt, resume)
            losses, resumed_from = list(resume.losses), resume.step
    peft_model.train()
    opt.zero_grad(set_to_none=True)  # nothing left over from a run that stopped mid-step (an OOM)
    for batch in batches(tok, examples, batch_size, max_len, seed, steps, skip=len(losses)):
        with pl.autocast():
            loss = peft_model(**pl.put(batch)).loss
        step(loss)
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if after_step is not None and len(losses) < steps:
            after_step(len(losses), lambda: _snapshot(named, opt, losses))
    peft_model.eval()
    return TrainResult(steps=len(losses), mean_loss=sum(losses) / len(losses), first_loss=losses[0], last_loss=losses[-1],
                       resumed_from=resumed_from)
