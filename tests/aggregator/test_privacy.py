"""The aggregator under distributed DP: the config refuses DP without secure aggregation, the
plan calibrates the noise for the threshold, the bounds check admits noisy sums (and not
garbage), the fleet's epsilon is recorded after every round and the fleet stops at its target."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from aggregator import plan, privacy, secure_round
from aggregator.config import AggregatorConfig, DPSettings
from aggregator.record import RoundRecord
from shared import dp, dp_account, secagg, update_codec
from shared import messages as M
from shared.config import from_dict
from shared.errors import ConfigError

DIM = 40


def _cfg(tmp_path: Path, **kw: object) -> AggregatorConfig:
    base: dict = {"broker": "mqtt://127.0.0.1:1", "student": "s", "eval_data": "e", "out_dir": str(tmp_path), "insecure": True,
                  "devices": ["device-0", "device-1", "device-2", "device-3", "device-4"], "mode": "fedit"}
    base.update(kw)
    return from_dict(AggregatorConfig, base)


def _round(rnd: int = 1, z: float = 1.0, n: int = 5, t: int = 3) -> M.RoundSpec:
    sa = M.SecAggSpec(node_ids=tuple(range(n)), threshold=t, graph_seed=bytes(32), clip=0.05, ring_bits=32, value_bits=28,
                      weight_norm=1, sketch_block=0)
    dps = dp.DPSpec(mechanism="skellam", l2_clip=1.0, noise_multiplier=z, quorum=t,
                    scale=dp.size_scale(1.0, z, t, n, DIM + update_codec.TAIL, 32, 1e-6), rotation_seed=bytes(32))
    return M.RoundSpec(round=rnd, participants=tuple(f"device-{i}" for i in range(n)), local_steps=1, learning_rate=0.1,
                       lora=M.LoraSpec(r=2, alpha=4.0, dropout=0.0, target_modules=("q",)), base_digest="0" * 64,
                       deadline_s=10.0, seed=1, adapter=(),
                       sparse=M.SparseSpec(method="dense", dim=DIM, k=DIM, seed=0, indices=b"", value_dtype="float32"),
                       secagg=M.SecAggSpec(**{**sa.__dict__, "dp": dps}))


def test_dp_without_secure_aggregation_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dp.enabled needs secagg = true: the DP noise is added inside the masked sum"):
        _cfg(tmp_path, secagg=False, dp={"enabled": True})
    assert _cfg(tmp_path, secagg=False).dp == DPSettings()  # off by default
    with pytest.raises(ConfigError, match="dp.delta"):
        _cfg(tmp_path, dp={"enabled": True, "delta": 2.0})
    with pytest.raises(ConfigError, match="unknown key"):
        _cfg(tmp_path, dp={"enabled": True, "epsilon": 3.0})


def test_the_plan_calibrates_for_the_threshold(tmp_path: Path) -> None:
    c = _cfg(tmp_path, dp={"enabled": True, "noise_multiplier": 0.7})
    sa = plan.secagg_spec(c, [f"device-{i}" for i in range(5)], {}, "dense")
    assert sa.ring_bits == 32
    spec = plan.dp_spec(c, sa, DIM)
    assert spec.quorum == sa.threshold and spec.noise_multiplier == 0.7 and len(spec.rotation_seed) == 32
    assert dp.wrap_bound(spec, 5, DIM, 32) <= c.dp.wrap_probability
    assert plan.dp_spec(c, sa, DIM).rotation_seed != spec.rotation_seed  # fresh per round
    too_many = _cfg(tmp_path, dp={"enabled": True, "quorum": sa.threshold + 1})
    with pytest.raises(secagg.SecAggAbort, match="above the round's threshold"):
        plan.dp_spec(too_many, sa, DIM)


def test_the_bounds_check_admits_noisy_sums_and_rejects_garbage() -> None:
    spec = _round()
    sa = spec.secagg
    assert sa is not None and sa.dp is not None
    rng = np.random.default_rng(0)
    n, k = 5, update_codec.secagg_dim(spec.sparse, sa)
    inputs = [np.concatenate([rng.uniform(-0.05, 0.05, DIM) * 0.3, update_codec.tail(1.0, 1.5, sa.clip)]) for _ in range(n)]
    for _ in range(20):
        total = np.zeros(update_codec.masked_dim(spec.sparse, sa), np.uint32)
        for x in inputs:
            np.add(total, dp.encode(x, sa.dp, 32, rng)[0], out=total, casting="unsafe")
        slots = secure_round.check_bounds(dp.decode_sum(total, sa.dp, 32, k), spec, n)
        assert np.abs(slots["values"] - sum(x[:DIM] for x in inputs)).max() < dp.noise_allowance(sa.dp, n, k)
    # One device that sends a value far outside its clip, at the ring's full scale: the round is void.
    bad = np.zeros(update_codec.masked_dim(spec.sparse, sa), np.uint32)
    bad[:] = dp.encode(np.concatenate([np.zeros(DIM), update_codec.tail(1.0, 0.0, sa.clip)]), sa.dp, 32, rng)[0]
    bad[5] = np.uint32((int(bad[5]) + (1 << 30)) % (1 << 32))
    with pytest.raises(secure_round.AggregateRejected, match="out of bounds"):
        secure_round.check_bounds(dp.decode_sum(bad, sa.dp, 32, k), spec, 1)


def test_the_fleet_stops_before_its_target_epsilon(caplog: pytest.LogCaptureFixture) -> None:
    settings = DPSettings(enabled=True, target_epsilon=20.0, delta=1e-5)
    acc = privacy.FleetAccountant(settings)
    ran = []
    with caplog.at_level(logging.INFO, logger="aggregator.privacy"):
        for rnd in range(1, 1000):
            try:
                acc.admit(_round(rnd))
            except privacy.BudgetSpent as e:
                stop = str(e)
                break
            ran.append(acc.charge(_round(rnd)))
    assert ran, "the first round fits a target of 20"
    assert all(r["epsilon"] <= 20.0 for r in ran) and [r["rounds"] for r in ran] == list(range(1, len(ran) + 1))
    one_more = dp_account.epsilon([*acc.spent, dp_account.round_cost(_round().secagg.dp, DIM + 2)], 1e-5)  # type: ignore[union-attr]
    assert one_more > 20.0
    assert f"past the target 20 (epsilon {ran[-1]['epsilon']:.4g} after {len(ran)} DP round(s))" in stop
    assert f"epsilon {ran[-1]['epsilon']:.4g} at delta 1e-05 after {len(ran)} DP round(s)" in caplog.text
    r = ran[-1]
    assert r["noise_multiplier"] == 1.0 and r["quorum"] == 3 and r["wrap_bound"] <= 1e-6 and r["amplification"].startswith("none")
    # A restarted aggregator rebuilds the same account from metrics.jsonl's records.
    recs = [SimpleNamespace(round=i + 1, privacy=p) for i, p in enumerate(ran)]
    again = privacy.FleetAccountant.from_records(settings, recs)  # type: ignore[arg-type]
    assert again.epsilon == pytest.approx(acc.epsilon)
    with pytest.raises(privacy.BudgetSpent):
        again.admit(_round(len(ran) + 1))


def test_no_target_never_stops() -> None:
    cost = dp_account.round_cost(_round().secagg.dp, DIM + 2)  # type: ignore[union-attr]
    assert privacy.stop_reason([cost] * 500, cost, 0.0, 1e-5) == ""
    assert "past the target 1" in privacy.stop_reason([], cost, 1.0, 1e-5)


def test_the_round_record_carries_the_privacy_entry() -> None:
    rec = RoundRecord.from_json({"round": 3, "status": "ok", "mode": "fedit", "eval": {}, "mean_loss": 1.0,
                                 "mean_exact_match": None, "privacy": {"epsilon": 1.5}})
    assert rec.privacy == {"epsilon": 1.5} and rec.to_json()["privacy"] == {"epsilon": 1.5}
    assert "privacy" not in RoundRecord.from_json({**rec.to_json(), "privacy": None}).to_json()  # rounds without DP keep their shape


def test_the_stop_is_logged_and_audited(caplog: pytest.LogCaptureFixture) -> None:
    from aggregator.server import Aggregator

    entries: list[tuple] = []
    fake = SimpleNamespace(audit=SimpleNamespace(append=lambda *a: entries.append(a)),
                           privacy=privacy.FleetAccountant(DPSettings(enabled=True, target_epsilon=1.0)))
    with caplog.at_level(logging.ERROR):
        Aggregator.stop_for_privacy(fake, 7, "the next round would take epsilon to 1.2")  # type: ignore[arg-type]
    assert "privacy budget reached: stopping the fleet before round 7: the next round would take epsilon to 1.2" in caplog.text
    assert entries == [("privacy_stop", 7, 0, "", {"reason": "the next round would take epsilon to 1.2", "epsilon": 0.0})]
