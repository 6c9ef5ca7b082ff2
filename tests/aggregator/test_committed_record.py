"""A round whose model was committed but whose record was not (the aggregator stopped while it
evaluated or released) still gets its record after a restart, marked as written late.

Seen in tests/test_faults.py: a kill that landed just after round 2's commit left metrics.jsonl
without round 2 while the restarted aggregator resumed from round 2's model.
"""

from __future__ import annotations

import json
from pathlib import Path

IDS = ["device-0", "device-1", "device-2"]


def _cfg(tiny_models: dict[str, str], tmp_path: Path):  # type: ignore[no-untyped-def]
    from aggregator.config import AggregatorConfig
    from fl_sim import prepare
    from fl_sim.run import make_keys

    data = prepare.generated(len(IDS), 12, 3, "family", 1.0, seed=0)
    paths = prepare.write_data(tmp_path, data)
    keys = make_keys(tmp_path / "keys", IDS)
    return AggregatorConfig(broker="mqtt://unused:1", student=tiny_models["student"], eval_data=str(paths.eval_dir),
                            out_dir=str(tmp_path / "agg"), keys=keys["aggregator"], registry=keys["registry"], rounds=3,
                            quorum=2, min_devices_to_start=3, secagg=False, eval_max_per_family=2, mode="fedit")


def _commit_round_1(cfg, summary: dict):  # type: ignore[no-untyped-def]
    """An aggregator that committed round 1's model with ``summary`` beside it."""
    from aggregator.server import Aggregator

    agg = Aggregator(cfg)
    agg.load_model()
    agg.store.mark_announced(1, {})  # as the round loop does before it collects
    agg.version += 1
    agg._checkpoint(1, summary=summary)
    return agg


def test_a_committed_round_without_a_record_is_recorded_on_restart(tiny_models: dict[str, str], tmp_path: Path) -> None:
    from aggregator.server import Aggregator

    cfg = _cfg(tiny_models, tmp_path)
    metrics = Path(cfg.out_dir) / "metrics.jsonl"
    _commit_round_1(cfg, {"participants": IDS, "received": IDS[:2],
                          "drop_reasons": {"device-2": "offline: connection lost"}, "secagg": False})
    # ... and the process stops here, before evaluating round 1 and appending its record.
    assert not metrics.exists()

    again = Aggregator(cfg)
    again.load_model()
    assert again.round == 1
    again.record_committed_round(metrics)
    again.record_committed_round(metrics)  # once only
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [(r["round"], r["status"]) for r in lines] == [(1, "ok")]
    r = lines[0]
    assert r["participants"] == IDS and r["received"] == IDS[:2] and r["dropped"] == ["device-2"]
    assert r["drop_reasons"] == {"device-2": "offline: connection lost"}
    assert "recorded after a restart" in r["note"]
    assert r["mean_loss"] > 0  # evaluated again: the resumed model's held-out loss


def test_a_round_with_its_record_is_not_recorded_again(tiny_models: dict[str, str], tmp_path: Path) -> None:
    from aggregator import record
    from aggregator.server import Aggregator

    cfg = _cfg(tiny_models, tmp_path)
    metrics = Path(cfg.out_dir) / "metrics.jsonl"
    first = _commit_round_1(cfg, {"participants": IDS, "received": IDS, "drop_reasons": {}, "secagg": False})
    student, _ = first.evaluate()
    record.append(metrics, record.RoundRecord(round=1, status="ok", mode="fedit", student=student))
    again = Aggregator(cfg)
    again.load_model()
    again.record_committed_round(metrics)
    assert record.last_round(metrics) == 1 and len(metrics.read_text().splitlines()) == 1


def test_an_interrupted_round_gets_its_record_and_the_shutdown_is_bound_to_it(tiny_models: dict[str, str],
                                                                              tmp_path: Path) -> None:
    """Issue 23: a round cut short by a kill left no line in metrics.jsonl (only the store's
    phases showed it), and a shutdown bound to the last completed round was refused by devices
    that had heard the later announcement."""
    from aggregator import record
    from aggregator.server import Aggregator

    cfg = _cfg(tiny_models, tmp_path)
    metrics = Path(cfg.out_dir) / "metrics.jsonl"
    first = _commit_round_1(cfg, {"participants": IDS, "received": IDS, "drop_reasons": {}, "secagg": False})
    student, _ = first.evaluate()
    record.append(metrics, record.RoundRecord(round=1, status="ok", mode="fedit", student=student))
    first.store.mark_announced(2, {})  # round 2 goes out ... and the process is killed in it
    again = Aggregator(cfg)
    again.load_model()
    assert (again.round, again.announced, again.shutdown_round) == (1, 2, 2)
    again.record_interrupted_round(metrics)
    again.record_interrupted_round(metrics)  # once only
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [(r["round"], r["status"]) for r in lines] == [(1, "ok"), (2, "interrupted")]
    assert "stopped during the round" in lines[1]["abandon_reason"] and "after a restart" in lines[1]["note"]
