"""When the aggregator releases (issue 12): after the last round, every N rounds, only rounds that completed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from aggregator.config import ReleaseConfig
from aggregator.server import Aggregator
from aggregator.store import Store


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


def test_only_if_improved_skips_a_release_that_is_not_better(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import aggregator.release

    calls = []
    monkeypatch.setattr(aggregator.release, "make_release", lambda *a, **k: calls.append(k["rnd"]))  # None: as if the gate failed
    rc = ReleaseConfig(every=1, only_if_improved=True)
    fake = SimpleNamespace(cfg=SimpleNamespace(rounds=6, release=rc, student="s"), release_key=object(), _released_loss=2.0,
                           student=SimpleNamespace(peft=None, tok=None), mode=SimpleNamespace(name="fedit"),
                           out=Path("/nonexistent"), eval_examples=[], store=Store(tmp_path / "aggregator.db"), audit=None)
    fake.build_release = lambda rnd: Aggregator.build_release(fake, rnd)  # type: ignore[arg-type]
    worse = Aggregator.release(fake, 3, SimpleNamespace(mean_loss=2.1))  # type: ignore[arg-type]
    assert not worse["published"] and "not below the last release's 2.0000" in worse["reason"] and calls == []
    better = Aggregator.release(fake, 4, SimpleNamespace(mean_loss=1.9))  # type: ignore[arg-type]
    assert calls == [4] and "parity gate" in better["reason"]
    last = Aggregator.release(fake, 6, SimpleNamespace(mean_loss=2.5))  # the last round always gets its release built
    assert calls == [4, 6] and not last["published"]
    # The store says what became of each: skipped, with why; none is left due (issue 23).
    rows = [(r.round, r.state, r.detail) for r in fake.store.releases() if r.state != "closed"]
    assert rows == [(3, "skipped", worse["reason"]), (4, "skipped", "parity gate failed"), (6, "skipped", "parity gate failed")]
    assert fake.store.due_release() is None and fake.store.latest_release() is None
