"""Local LoRA training: the only place a device's private examples touch the model."""

from __future__ import annotations

import logging
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


def train_lora(peft_model: Any, tok: Any, examples: list[Example], *, steps: int, lr: float, batch_size: int, max_len: int, seed: int) -> TrainResult:
    """AdamW on the adapter only (the base stays frozen), fresh optimizer each round as in FedIT."""
    import torch

    torch.manual_seed(seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    peft_model.train()
    losses: list[float] = []
    for batch in batches(tok, examples, batch_size, max_len, seed, steps):
        loss = peft_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    peft_model.eval()
    return TrainResult(steps=len(losses), mean_loss=sum(losses) / len(losses), first_loss=losses[0], last_loss=losses[-1])
