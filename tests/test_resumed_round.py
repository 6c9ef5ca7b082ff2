"""A device killed while it trains a plain round, restarted at once, finishes that round (issue 13).

The real aggregator and three edge clients run in this process over the in-memory bus
(``tests.bus``), security on and secure aggregation off. device-0 dies right after writing its
first training checkpoint of round 1 (its last will goes out as a broker's would) and a new
``EdgeClient`` with the same config and work directory takes its place. The round waits for it,
accepts its update once, and moves the global adapter by exactly the example-weighted mean of the
three devices' contributions (their ``keep_sent`` copies). The same over Mosquitto with real
processes and ``kill -9`` is in tests/test_faults.py (slow).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared import sparse, topics
from tests.bus import Bus, FakeLink

IDS = ["device-0", "device-1", "device-2"]
VICTIM = "device-0"


class Killed(Exception):
    pass


def _edge(cfg: Any, bus: Bus) -> Any:
    from edge_client.client import EdgeClient

    e = EdgeClient(cfg)
    e.load_model()
    e.link = FakeLink(bus, cfg.device_id)
    e.on_connected()
    return e


def test_a_device_killed_mid_training_and_restarted_finishes_its_round(tiny_models: dict[str, str], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    from aggregator.config import AggregatorConfig
    from aggregator.server import Aggregator
    from edge_client import train_checkpoint
    from edge_client.config import EdgeConfig
    from fl_sim import prepare
    from fl_sim.run import make_keys

    data = prepare.generated(len(IDS), 12, 3, "family", 1.0, seed=0)
    paths = prepare.write_data(tmp_path, data)
    keys = make_keys(tmp_path / "keys", IDS)
    bus = Bus()
    cfgs = {d: EdgeConfig(device_id=d, broker="mqtt://unused:1", data=str(shard), student=tiny_models["student"],
                          work_dir=str(tmp_path / "edge" / d), keys=keys[d], aggregator_keys=keys["aggregator_pub"],
                          keep_sent=True, checkpoint_every_s=0.0)
            for d, shard in zip(IDS, paths.shards)}
    edges = {d: _edge(cfgs[d], bus) for d in IDS}

    real_save, kills = train_checkpoint.save, []

    def save(work: Path, ck: train_checkpoint.Checkpoint) -> None:
        real_save(work, ck)
        if work.name == VICTIM and not kills:
            kills.append((ck.header.round, ck.state.step))
            raise Killed  # right after its first checkpoint is on disk

    monkeypatch.setattr(train_checkpoint, "save", save)

    def pump() -> None:
        for d in IDS:
            e = edges[d]
            try:
                while e.link.inbox:
                    inc = e.link.inbox.popleft()
                    e.handle(inc.topic, inc.payload)
            except Killed:
                bus.links.remove(e.link)  # the process is gone; the broker sends its last will
                bus.publish(topics.up(d, "status"), e._status("offline", "connection lost"), retain=True)
                edges[d] = new = _edge(cfgs[d], bus)  # `fl-edge run` again
                new.resume_round()

    agg = Aggregator(AggregatorConfig(
        broker="mqtt://unused:1", student=tiny_models["student"], eval_data=str(paths.eval_dir), out_dir=str(tmp_path / "agg"),
        keys=keys["aggregator"], registry=keys["registry"], rounds=99, quorum=3, min_devices_to_start=3, local_steps=6,
        learning_rate=5e-3, secagg=False, round_timeout_s=60.0, eval_max_per_family=2, mode="fedit"))
    agg.load_model()
    agg.link = FakeLink(bus, "aggregator", pump=pump)
    agg.link.subscribe(topics.up_filter())
    agg.wait_for_devices()
    for rnd in (1, 2):
        before = sparse.flatten(agg.global_state, agg.layout)
        with caplog.at_level(logging.INFO):
            rec = agg.run_round(rnd)
        after = sparse.flatten(agg.global_state, agg.layout)
        assert rec.status == "ok" and rec.received == IDS and rec.drop_reasons == {}, (rec.drop_reasons, rec.abandon_reason)
        assert rec.rejected_messages == 0
        n = {d: len(edges[d].examples) for d in IDS}
        sent = {d: np.load(tmp_path / "edge" / d / "sent" / f"round_{rnd:04d}.npy") for d in IDS}
        expected = sum(n[d] * sent[d].astype(np.float64) for d in IDS) / sum(n.values())
        bound = 2 * np.finfo(np.float32).eps * float(np.abs(after).max() + np.abs(expected).max())
        assert np.abs((after.astype(np.float64) - before) - expected).max() <= bound
        assert np.count_nonzero(sent[VICTIM]) > 0.5 * sent[VICTIM].size
    assert kills == [(1, 1)]
    log = caplog.text
    assert "device-0: resuming round 1 from its training checkpoint at step 1" in log
    assert "round 1: device device-0 restarted and resumes the round (resuming round 1 at step 1)" in log
    # One update per round from the restarted device, and its counter went on from the old one's.
    assert re.findall(r"round (\d): update from device-0", log) == ["1", "2"]
    assert agg.col.last_seq[VICTIM] == edges[VICTIM].seq == 2
    assert not (tmp_path / "edge" / VICTIM / train_checkpoint.FILE).exists()
