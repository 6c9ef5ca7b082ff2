"""Server strategies in Flower's shape: configure a round, aggregate the replies. Pure numpy."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Reply:
    """What the strategy needs from one accepted update."""

    device_id: str
    num_examples: int
    delta: dict[str, np.ndarray]


class Strategy(Protocol):
    def configure_round(self, rnd: int, online: Sequence[str]) -> list[str]: ...

    def aggregate(self, global_state: dict[str, np.ndarray], replies: Sequence[Reply]) -> dict[str, np.ndarray]: ...


def weighted_mean(replies: Sequence[Reply]) -> dict[str, np.ndarray]:
    """Example-weighted mean of the deltas, accumulated in float64 so the order does not matter."""
    total = sum(r.num_examples for r in replies)
    if total <= 0:
        raise ValueError("no examples behind the replies")
    keys = replies[0].delta.keys()
    out: dict[str, np.ndarray] = {}
    for k in keys:
        acc = np.zeros(replies[0].delta[k].shape, dtype=np.float64)
        for r in replies:
            acc += (r.num_examples / total) * r.delta[k].astype(np.float64)
        out[k] = acc.astype(np.float32)
    return out


@dataclass
class FedAvg:
    """FedIT's baseline: LoRA FedAvg weighted by examples, with an optional server learning rate."""

    server_lr: float = 1.0
    clients_per_round: int = 0  # 0 = all online
    seed: int = 0

    def configure_round(self, rnd: int, online: Sequence[str]) -> list[str]:
        ids = sorted(online)
        if self.clients_per_round and len(ids) > self.clients_per_round:
            ids = sorted(random.Random(f"{self.seed}:{rnd}").sample(ids, self.clients_per_round))
        return ids

    def aggregate(self, global_state: dict[str, np.ndarray], replies: Sequence[Reply]) -> dict[str, np.ndarray]:
        return self.apply(global_state, weighted_mean(replies))

    def apply(self, global_state: dict[str, np.ndarray], mean: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One server step from the mean delta (all the server knows under secure aggregation)."""
        return {k: (global_state[k] + self.server_lr * mean[k]).astype(np.float32) for k in global_state}
