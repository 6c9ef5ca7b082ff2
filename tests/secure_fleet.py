"""The in-process secure fleet the secure-aggregation tests share: the real aggregator and edge
clients over the in-memory bus (``tests.bus``), tiny offline models, real LoRA deltas.

Each device keeps a plaintext copy of what it contributed (``keep_sent``): what the tests compare
the aggregator's result with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared import messages as M
from shared import sparse, update_codec
from shared.secagg.quant import error_bound
from tests.bus import Bus, DropPlan, FakeLink

N = 5
T = 3  # threshold (more than half of the 5): n - t = 2 dropouts still give a sum; 3 must abort


def build_fleet(tiny_models: dict[str, str], root: Path, device_overrides: dict | None = None, n: int = N,
                 **overrides: object):
    from aggregator.config import AggregatorConfig
    from aggregator.server import Aggregator
    from edge_client.client import EdgeClient
    from edge_client.config import EdgeConfig
    from fl_sim import prepare
    from fl_sim.run import make_keys
    from shared import topics

    ids = [f"device-{i}" for i in range(n)]
    # One family per device up to the five generated families; beyond, each device a mix of them.
    data = prepare.generated(n, 12, 3, "family", 1.0, seed=0) if n <= 5 else prepare.generated(n, 3 * n, 3, "dirichlet", 50.0, seed=0)
    paths = prepare.write_data(root, data)
    shards, eval_dir = paths.shards, paths.eval_dir
    keys = make_keys(root / "keys", ids)
    bus = Bus()
    plan = DropPlan()
    edges = []
    # t = 3 of 5 (n - t = 2 dropouts) is below the devices' default floor of ceil(2k/3) = 4: these
    # devices accept down to more than half (tests of the floors pass device_overrides).
    dev_kw: dict = dict(secagg_min_threshold=0.5, allow_plain_rounds=not overrides.get("secagg", True))
    dev_kw.update(device_overrides or {})
    for dev, shard in zip(ids, shards):
        e = EdgeClient(EdgeConfig(device_id=dev, broker="mqtt://unused:1", data=str(shard), student=tiny_models["student"],
                                  work_dir=str(root / "edge" / dev), keys=keys[dev], aggregator_keys=keys["aggregator_pub"],
                                  authority_keys=keys["authority_pub"], cert=keys[f"{dev}_cert"], keep_sent=True, **dev_kw))
        e.load_model()
        e.link = FakeLink(bus, dev, outgoing=plan.filter(dev))
        e.link.subscribe(topics.bcast_filter())
        e.link.subscribe(topics.down_filter(dev))
        e.publish_status("online")
        edges.append(e)
    settings: dict = dict(broker="mqtt://unused:1", student=tiny_models["student"], eval_data=str(eval_dir),
                          out_dir=str(root / "agg"), keys=keys["aggregator"], registry=keys["registry"],
                          authority=keys["authority_pub"], rounds=99,
                          quorum=1, min_devices_to_start=n, local_steps=3, learning_rate=5e-3, secagg=True,
                          secagg_threshold=T, density=0.25, value_bits=22, clip=0.05, key_timeout_s=5.0,
                          sparse_method="topk",  # rounds after the first pick from the masked magnitude sketch
                          round_timeout_s=60.0, eval_max_per_family=2, keep_received=True, mode="fedit")
    settings.update(overrides)
    agg = Aggregator(AggregatorConfig(**settings))
    agg.load_model()
    agg.link = FakeLink(bus, "aggregator", pump=lambda: [plan.step(e) for e in edges])
    agg.link.subscribe(topics.up_filter())
    agg.wait_for_devices()
    assert sorted(agg.online) == sorted(ids)
    return agg, edges, plan, root


def sent(root: Path, dev: str, rnd: int) -> np.ndarray:
    return np.load(root / "edge" / dev / "sent" / f"round_{rnd:04d}.npy")


def run_round(fleet, drops: dict[str, str], replay: set[str] = frozenset()) -> tuple[dict, np.ndarray, np.ndarray]:  # type: ignore[assignment]
    agg, edges, plan, _ = fleet
    rnd = agg.round + 1
    plan.start_round(drops, edges, replay)
    agg.drain()
    before = sparse.flatten(agg.global_state, agg.layout)
    rec = agg.run_round(rnd)
    after = sparse.flatten(agg.global_state, agg.layout)
    return rec, before, after


def check_sum(fleet, rec: dict, before: np.ndarray, after: np.ndarray) -> None:
    agg, edges, _, root = fleet
    assert rec.status == "ok", rec.abandon_reason
    n = len(rec.participants)
    # Every device weighs 1 under secure aggregation: the mean of the contributions in the sum.
    expected = sum(sent(root, d, rec.round) for d in rec.received) / len(rec.received)
    ring, vbits = update_codec.ring_for(n, agg.cfg.value_bits)
    bound = error_bound(update_codec.quant_config(M.SecAggSpec(
        node_ids=tuple(range(n)), threshold=T, graph_seed=bytes(32), clip=agg.cfg.clip, ring_bits=ring,
        value_bits=vbits, weight_norm=1, sketch_block=0)), len(rec.received)) / len(rec.received)
    got = after - before
    # Plus float32 rounding: the global adapter is stored (and the mean applied) in float32.
    bound += 2 * np.finfo(np.float32).eps * float(np.abs(after).max() + np.abs(expected).max())
    assert np.abs(got - expected).max() <= bound, (np.abs(got - expected).max(), bound)
    assert np.count_nonzero(expected) > 0.5 * rec.sparse["k"]  # real, non-trivial training deltas
    assert np.count_nonzero(got) <= rec.sparse["k"]  # only the round's index set moved
