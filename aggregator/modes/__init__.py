"""Round-loop plug-ins: what the aggregator does after aggregation, besides FedAvg.

A mode is a module with ``make(ctx: ModeContext) -> Mode``. The round loop calls, in order,
``scoring`` while planning (rollouts the devices score this round, or None), ``take_fleet`` with
the fleet's mean scores once the secure sum is open, ``distil`` after a round's aggregate is applied (the mode may move the student's adapter: the
distilled student is next round's global model) and ``evaluate`` for the mode's own models;
``checkpoint_models`` names what the checkpoint saves beside the student, and ``resume`` loads it
back. Adding a mode is a module and a line in ``REGISTRY``; the loop does not change.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.model import HostedModel
    from aggregator.record import ModelEvals
    from shared.datasets import Example
    from shared.messages import ScoringSpec

REGISTRY: dict[str, str] = {
    "fedit": "aggregator.modes.fedit",  # LoRA FedAvg only (FedIT): the baseline
    "fedkd": "aggregator.modes.fedkd",  # + token-level mutual distillation with a teacher (FedMKT/FedCoLLM)
    "fl-minillm": "aggregator.modes.flminillm",  # + sequence-level (MiniLLM) distillation, alternating roles
}


@dataclass
class ModeContext:
    cfg: AggregatorConfig
    out: Path
    student: HostedModel
    public: list[Example]  # the aggregator's public set; empty when the config names none
    eval_private: list[Example]
    eval_public: list[Example]


class Mode(Protocol):
    name: str

    def scoring(self, rnd: int) -> ScoringSpec | None: ...  # rollouts for the fleet to score this round

    def take_fleet(self, rnd: int, scores: Any) -> None: ...  # the fleet's mean scores, after aggregation

    def distil(self, rnd: int) -> dict[str, Any] | None: ...

    def evaluate(self) -> ModelEvals | None: ...

    def checkpoint_models(self) -> dict[str, Any]: ...

    def resume(self, checkpoints: dict[str, str]) -> None: ...


def make(name: str, ctx: ModeContext) -> Mode:
    if name not in REGISTRY:
        raise ValueError(f"unknown mode {name!r}; known: {sorted(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).make(ctx)  # type: ignore[no-any-return]
