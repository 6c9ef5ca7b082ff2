"""A distributed-DP secure round through the real aggregator and edge clients (tests.secure_fleet):
the round completes, with every device and with only the quorum left, the global model moves by
the mean of what the devices sent (L2-clipped) within the noise, both sides record their epsilon,
and the fleet's target stops it before the round that would pass it is announced."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from shared import ledger

from aggregator import plan, privacy
from aggregator.config import DPSettings
from shared import dp, update_codec
from tests.secure_fleet import N, T, build_fleet, run_round, sent


def test_a_dp_secure_round_completes_within_its_noise(tiny_models: dict[str, str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    specs = []
    real = plan.round_spec

    def keep(*a, **k):  # type: ignore[no-untyped-def]
        specs.append(real(*a, **k))
        return specs[-1]

    monkeypatch.setattr(plan, "round_spec", keep)
    # z small, so "within the noise" is a tight check of the arithmetic; the L2 clip binds.
    fleet = build_fleet(tiny_models, tmp_path, dp=DPSettings(enabled=True, l2_clip=0.05, noise_multiplier=1e-4))
    agg, edges, _, root = fleet
    rec, before, after = run_round(fleet, {})
    assert rec.status == "ok", rec.abandon_reason
    assert rec.received == [f"device-{i}" for i in range(N)]
    spec = specs[-1]
    sa = spec.secagg
    assert sa is not None and sa.dp is not None and sa.dp.quorum == T
    expected = sum(sent(root, d, rec.round) for d in rec.received) / N
    k = update_codec.secagg_dim(spec.sparse, sa, spec.scoring)
    allowance = dp.noise_allowance(sa.dp, N, k) / N
    got = after - before
    assert np.abs(got - expected).max() <= allowance + 1e-6
    assert np.abs(expected).max() > 10 * allowance  # real deltas, far above the noise
    assert rec.privacy is not None and rec.privacy["epsilon"] > 0 and rec.privacy["rounds"] == 1
    assert rec.to_json()["privacy"]["epsilon"] == rec.privacy["epsilon"]  # what metrics.jsonl gets
    for e in edges:
        acct = json.loads((Path(e.cfg.work_dir) / "privacy.json").read_text())
        assert list(acct["rounds"]) == [str(rec.round)] and acct["epsilon"] > 0
        # The ledger entry of the masked update carries its clip, noise and the epsilon after it.
        assert e.ledger is not None
        masked = [o["entry"] for _, _, o in ledger.entries(e.ledger.path) if o["entry"]["kind"] == "masked_update"]
        note = masked[-1]["detail"]["privacy"]
        assert note["l2_clip"] == sa.dp.l2_clip and note["noise_multiplier"] == sa.dp.noise_multiplier
        assert note["epsilon_after"] == pytest.approx(acct["epsilon"])

    # Two dropouts before their masked inputs: only the quorum is left, the round still completes
    # (the dropped devices' masks are rebuilt over the padded, rotated length), within its noise.
    drops = {f"device-{N - 1 - i}": "masked" for i in range(N - T)}
    rec, before, after = run_round(fleet, drops)
    assert rec.status == "ok", rec.abandon_reason
    assert rec.received == [f"device-{i}" for i in range(T)] and rec.privacy is not None and rec.privacy["rounds"] == 2
    expected = sum(sent(root, d, rec.round) for d in rec.received) / T
    sa = specs[-1].secagg
    assert sa is not None and sa.dp is not None
    assert np.abs((after - before) - expected).max() <= dp.noise_allowance(sa.dp, T, update_codec.secagg_dim(
        specs[-1].sparse, sa, specs[-1].scoring)) / T + 1e-6
    # The fleet's target reached: the next round is planned but never announced.
    assert agg.privacy is not None
    agg.privacy.settings = dataclasses.replace(agg.privacy.settings, target_epsilon=rec.privacy["epsilon"] * 1.01)
    announced = agg.announced
    with pytest.raises(privacy.BudgetSpent, match="past the target"):
        agg.run_round(rec.round + 1)
    assert agg.announced == announced and agg.round == rec.round
