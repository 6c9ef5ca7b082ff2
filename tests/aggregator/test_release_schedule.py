"""When the aggregator releases (issue 12): after the last round, every N rounds, only rounds that completed."""

from __future__ import annotations

from types import SimpleNamespace

from aggregator.config import ReleaseConfig
from aggregator.server import Aggregator


def _due(rounds: int, rc: ReleaseConfig, status: dict[int, str] | None = None) -> list[int]:
    fake = SimpleNamespace(cfg=SimpleNamespace(rounds=rounds, release=rc))
    status = status or {}
    return [r for r in range(1, rounds + 1)
            if Aggregator._release_due(fake, r, SimpleNamespace(status=status.get(r, "ok")))]  # type: ignore[arg-type]


def test_schedule() -> None:
    assert _due(6, ReleaseConfig()) == [6]  # default: after the last round only
    assert _due(6, ReleaseConfig(every=2)) == [2, 4, 6]
    assert _due(7, ReleaseConfig(every=3)) == [3, 6, 7]
    assert _due(6, ReleaseConfig(every=2), {4: "abandoned", 6: "abandoned"}) == [2]  # nothing new to release
    assert _due(6, ReleaseConfig(enabled=False, every=1)) == []
