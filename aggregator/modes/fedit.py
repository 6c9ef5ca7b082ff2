"""``fedit``: LoRA FedAvg and nothing else (FedIT, Shepherd, FATE-LLM's FedHomoLLM)."""

from __future__ import annotations

from typing import Any

from aggregator.modes import ModeContext
from aggregator.record import ModelEvals


class FedIT:
    name = "fedit"

    def scoring(self, rnd: int) -> None:
        return None

    def take_fleet(self, rnd: int, scores: Any) -> None:
        return None

    def distil(self, rnd: int) -> dict[str, Any] | None:
        return None

    def evaluate(self) -> ModelEvals | None:
        return None

    def checkpoint_models(self) -> dict[str, Any]:
        return {}

    def resume(self, checkpoints: dict[str, str]) -> None:
        return None


def make(ctx: ModeContext) -> FedIT:
    return FedIT()
