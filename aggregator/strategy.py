"""Server strategies in Flower's shape: configure a round, aggregate what came back. Pure numpy.

Every optimizer here needs only the round's mean update (FedAvg, FedAvgM, FedAdam of Reddi et
al. 2021, "Adaptive Federated Optimization"), so each works the same under secure aggregation,
where the mean is all the server ever learns. ``aggregate`` takes the individual replies of a
plain round; ``aggregate_mean`` takes the mean a secure round recovered; both end in ``step``.
Optimizer state (momentum, second moments) is the server's own and survives restarts through
``state_arrays`` / ``load_state_arrays``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class Reply:
    """What the strategy needs from one accepted update."""

    device_id: str
    num_examples: int
    delta: Tensors


class Strategy(Protocol):
    name: str

    def configure_round(self, rnd: int, online: Sequence[str], count: int = 0) -> list[str]: ...

    def aggregate(self, global_state: Tensors, replies: Sequence[Reply]) -> Tensors: ...

    def aggregate_mean(self, global_state: Tensors, mean: Tensors) -> Tensors: ...

    def state_arrays(self) -> Tensors: ...

    def load_state_arrays(self, arrays: Tensors) -> None: ...


def weighted_mean(replies: Sequence[Reply]) -> Tensors:
    """Example-weighted mean of the deltas, accumulated in float64 so the order does not matter."""
    total = sum(r.num_examples for r in replies)
    if total <= 0:
        raise ValueError("no examples behind the replies")
    keys = replies[0].delta.keys()
    out: Tensors = {}
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
    name: str = "fedavg"

    def configure_round(self, rnd: int, online: Sequence[str], count: int = 0) -> list[str]:
        """A seeded sample of ``count`` (default ``clients_per_round``; 0 = all) online devices."""
        ids = sorted(online)
        want = count or self.clients_per_round
        if want and len(ids) > want:
            ids = sorted(random.Random(f"{self.seed}:{rnd}").sample(ids, want))
        return ids

    def aggregate(self, global_state: Tensors, replies: Sequence[Reply]) -> Tensors:
        return self.aggregate_mean(global_state, weighted_mean(replies))

    def aggregate_mean(self, global_state: Tensors, mean: Tensors) -> Tensors:
        missing = sorted(set(global_state) - set(mean))
        if missing:
            raise ValueError(f"mean update lacks {len(missing)} adapter tensors, e.g. {missing[0]}")
        return {k: (global_state[k] + self.step(k, mean[k].astype(np.float64))).astype(np.float32) for k in global_state}

    def step(self, key: str, mean: np.ndarray) -> np.ndarray:
        """The server's move for one tensor, given the round's mean delta (float64)."""
        return self.server_lr * mean

    def state_arrays(self) -> Tensors:
        return {}

    def load_state_arrays(self, arrays: Tensors) -> None:
        return None


@dataclass
class FedAvgM(FedAvg):
    """FedAvg with server momentum (Hsu et al. 2019): v = beta*v + mean; x += lr*v."""

    momentum: float = 0.9
    name: str = "fedavgm"
    _v: Tensors = field(default_factory=dict, repr=False)

    def step(self, key: str, mean: np.ndarray) -> np.ndarray:
        v = self.momentum * self._v.get(key, np.zeros_like(mean)) + mean
        self._v[key] = v
        return self.server_lr * v

    def state_arrays(self) -> Tensors:
        return {f"v/{k}": v for k, v in self._v.items()}

    def load_state_arrays(self, arrays: Tensors) -> None:
        self._v = {k[2:]: np.asarray(v, np.float64) for k, v in arrays.items() if k.startswith("v/")}


@dataclass
class FedAdam(FedAvg):
    """FedAdam (Reddi et al. 2021, Algorithm 2): m = b1*m + (1-b1)*d; v = b2*v + (1-b2)*d^2;
    x += lr * m / (sqrt(v) + tau). No bias correction, as in the paper; tau bounds the step of
    coordinates that have barely moved."""

    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    name: str = "fedadam"
    _m: Tensors = field(default_factory=dict, repr=False)
    _v: Tensors = field(default_factory=dict, repr=False)

    def step(self, key: str, mean: np.ndarray) -> np.ndarray:
        m = self.beta1 * self._m.get(key, np.zeros_like(mean)) + (1 - self.beta1) * mean
        v = self.beta2 * self._v.get(key, np.zeros_like(mean)) + (1 - self.beta2) * mean * mean
        self._m[key], self._v[key] = m, v
        return self.server_lr * m / (np.sqrt(v) + self.tau)

    def state_arrays(self) -> Tensors:
        return {**{f"m/{k}": v for k, v in self._m.items()}, **{f"v/{k}": v for k, v in self._v.items()}}

    def load_state_arrays(self, arrays: Tensors) -> None:
        self._m = {k[2:]: np.asarray(v, np.float64) for k, v in arrays.items() if k.startswith("m/")}
        self._v = {k[2:]: np.asarray(v, np.float64) for k, v in arrays.items() if k.startswith("v/")}


OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")


def make_strategy(name: str, *, server_lr: float, clients_per_round: int, seed: int, momentum: float = 0.9,
                  beta2: float = 0.99, tau: float = 1e-3) -> FedAvg:
    if name == "fedavg":
        return FedAvg(server_lr=server_lr, clients_per_round=clients_per_round, seed=seed)
    if name == "fedavgm":
        return FedAvgM(server_lr=server_lr, clients_per_round=clients_per_round, seed=seed, momentum=momentum)
    if name == "fedadam":
        return FedAdam(server_lr=server_lr, clients_per_round=clients_per_round, seed=seed, beta1=momentum, beta2=beta2, tau=tau)
    raise ValueError(f"server_optimizer must be one of {OPTIMIZERS}, got {name!r}")
