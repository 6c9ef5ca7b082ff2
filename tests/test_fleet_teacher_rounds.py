"""fl-minillm's client-teacher rounds through the real aggregator and edge clients (issue 10).

The fleet as teacher under secure aggregation: the aggregator's teacher samples rollouts on
public prompts and sends them with its top-k candidates in the signed round spec; each device
scores them with its locally trained student and adds the scores to its masked update. What the
aggregator learns is the weighted mean of the devices' distributions, within the fixed-point
bound, with and without a dropout; each device's own scores (kept in clear on the device for this
check, ``keep_sent``) appear nowhere in what the aggregator wrote or logged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared import update_codec
from shared.secagg.quant import error_bound
from tests.secure_fleet import N, build_fleet, check_sum, run_round
from tests.test_secure_rounds import CHI2_255, _chi2_bytes


@pytest.fixture(scope="module")
def fleet(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    from aggregator.config import MiniLLMConfig

    root = tmp_path_factory.mktemp("fleet_teacher")
    # _build_fleet writes the simulation's data (public set included) under root/data.
    return build_fleet(tiny_models, root, mode="fl-minillm", teacher=tiny_models["teacher"],
                        public_data=str(root / "data" / "public" / "public.jsonl"),
                        minillm=MiniLLMConfig(roles=("client",), prompts=4, max_new_tokens=5, candidates=6, steps=2,
                                              ppo_epochs=1))


def _fleet_round(fleet, drops: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    agg = fleet[0]
    seen: dict[int, np.ndarray] = {}
    real = agg.mode.take_fleet
    monkeypatch.setattr(agg.mode, "take_fleet", lambda rnd, s: (seen.__setitem__(rnd, np.array(s)), real(rnd, s)))
    rec, before, after = run_round(fleet, drops)
    return rec, before, after, seen


def _expected(fleet, rec) -> tuple[np.ndarray, float]:
    agg, edges, _, root = fleet
    w = {d: 1.0 for d in rec.received}  # every device weighs 1 under secure aggregation
    sent = {d: np.load(root / "edge" / d / "sent" / f"round_{rec.round:04d}_scores.npy") for d in rec.received}
    want = sum(w[d] * sent[d] for d in rec.received) / sum(w.values())
    ring, vbits = update_codec.ring_for(N, agg.cfg.value_bits)
    from shared import messages as M

    cfg = update_codec.quant_config(M.SecAggSpec(node_ids=tuple(range(N)), threshold=3, graph_seed=bytes(32),
                                                 clip=agg.cfg.clip, ring_bits=ring, value_bits=vbits, weight_norm=1,
                                                 sketch_block=0))
    # scores_from_sum divides the summed error by 2 * total weight * clip
    bound = error_bound(cfg, len(rec.received)) / (2 * sum(w.values()) * agg.cfg.clip) + 1e-9
    return want, bound


@pytest.mark.parametrize("drops", [{}, {f"device-{N - 1}": "masked"}], ids=["all", "one dropout"])
def test_the_aggregator_learns_the_fleets_mean_distribution_and_nothing_else(fleet, drops, monkeypatch) -> None:
    rec, before, after, seen = _fleet_round(fleet, drops, monkeypatch)
    assert rec.status == "ok" and len(rec.received) == N - len(drops)
    check_sum(fleet, rec, before, after)  # the update part is as exact as ever
    got = seen[rec.round]
    want, bound = _expected(fleet, rec)
    assert got.shape == want.shape and np.count_nonzero(want) > 0.5 * want.size
    assert np.abs(got - want).max() <= bound, (np.abs(got - want).max(), bound)
    # It is a distribution per scored position: K candidates + the rest sum to one (masked ones are zero).
    d = rec.distil
    assert d["role"] == "client" and d["learner"] == "teacher" and d["steps"] == 2
    assert d["scoring_values"] == got.size and d["scoring_up_bytes_per_device"] > 0
    per = got.reshape(-1, 7).sum(-1)
    assert np.all((np.abs(per - 1) < 1e-3) | (np.abs(per) < 1e-3))
    # What it stored of each device (the masked vector, scores included) is uniform bytes, and no
    # device's own scores are in anything it wrote.
    agg, _, _, root = fleet
    from shared import messages as M

    for dev in rec.received:
        up = M.decode((agg.out / "received" / f"round_{rec.round:04d}" / f"{dev}.msgpack").read_bytes(), expect=M.MaskedUpdate)
        assert _chi2_bytes(up.masked) < CHI2_255  # type: ignore[attr-defined]
    blob = b"".join(p.read_bytes() for p in Path(agg.out).rglob("*") if p.is_file())
    for dev in rec.received:
        mine = np.load(root / "edge" / dev / "sent" / f"round_{rec.round:04d}_scores.npy")
        for dt in ("<f8", "<f4"):
            assert mine.astype(dt).tobytes()[:64] not in blob
