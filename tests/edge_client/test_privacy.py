"""The device's own DP accounting (edge_client.privacy): it declines rounds below its noise floor
or past its epsilon budget, with a signed ``declined`` naming the reason, and keeps its epsilon
across restarts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_client import update_builder
from edge_client.privacy import DeviceAccountant, PrivacyFloors
from shared import dp, dp_account, sparse, topics, update_codec
from shared import messages as M
from shared.errors import ConfigError

DIM = 6


def _spec(rnd: int = 1, z: float = 1.0, quorum: int = 2, threshold: int = 2, with_dp: bool = True) -> M.RoundSpec:
    dps = dp.DPSpec(mechanism="skellam", l2_clip=1.0, noise_multiplier=z, quorum=quorum, scale=1e4, rotation_seed=bytes(32))
    sa = M.SecAggSpec(node_ids=(0, 1, 2), threshold=threshold, graph_seed=bytes(32), clip=0.05, ring_bits=32, value_bits=30,
                      weight_norm=1, sketch_block=0, dp=dps if with_dp else None)
    return M.RoundSpec(round=rnd, participants=("device-0", "device-1", "device-2"), local_steps=1, learning_rate=0.1,
                       lora=M.LoraSpec(r=2, alpha=4.0, dropout=0.0, target_modules=("q",)), base_digest="0" * 64,
                       deadline_s=10.0, seed=1, adapter=(),
                       sparse=M.SparseSpec(method="dense", dim=DIM, k=DIM, seed=0, indices=b"", value_dtype="float32"), secagg=sa)


def _one_round_eps(z: float = 1.0) -> float:
    sa = _spec(z=z).secagg
    assert sa is not None and sa.dp is not None
    return dp_account.epsilon([dp_account.round_cost(sa.dp, DIM + update_codec.TAIL)], 1e-5)


def test_no_floors_take_every_round_and_still_count(tmp_path: Path) -> None:
    acc = DeviceAccountant(tmp_path, PrivacyFloors())
    assert acc.refusal(_spec()) == "" and acc.refusal(_spec(with_dp=False)) == ""
    assert acc.charge(_spec(with_dp=False)) is None and acc.epsilon == 0.0
    assert acc.charge(_spec(rnd=1)) == pytest.approx(_one_round_eps())
    assert acc.charge(_spec(rnd=1)) == pytest.approx(_one_round_eps())  # a round is charged once


@pytest.mark.parametrize(("spec", "reason"), [
    (_spec(z=0.5), "noise multiplier 0.5 (with its quorum of 2) is below this device's floor of 0.9"),
    (_spec(with_dp=False), "adds no DP noise, below this device's floor"),
    (_spec(quorum=3, threshold=2), "calibrated for 3 survivors but secure aggregation unmasks sums of as few as 2"),
])
def test_a_round_below_the_noise_floor_is_declined(tmp_path: Path, spec: M.RoundSpec, reason: str) -> None:
    acc = DeviceAccountant(tmp_path, PrivacyFloors(min_noise_multiplier=0.9))
    assert reason in acc.refusal(spec)
    assert acc.refusal(_spec(z=1.0)) == ""


def test_a_round_past_the_budget_is_declined_and_the_budget_survives_a_restart(tmp_path: Path) -> None:
    one = _one_round_eps()
    floors = PrivacyFloors(max_epsilon=one * 2.5)  # two rounds fit (epsilon grows slower than linearly), not many more
    acc = DeviceAccountant(tmp_path, floors)
    rnd = 1
    while not acc.refusal(_spec(rnd=rnd)):
        acc.charge(_spec(rnd=rnd))
        rnd += 1
    assert rnd > 2 and acc.epsilon <= floors.max_epsilon  # type: ignore[operator]
    why = acc.refusal(_spec(rnd=rnd))
    assert "would take this device's epsilon to" in why and f"past its maximum of {floors.max_epsilon:g}" in why
    again = DeviceAccountant(tmp_path, floors)  # a restarted device remembers what it spent
    assert again.epsilon == pytest.approx(acc.epsilon) and again.refusal(_spec(rnd=rnd)) == why
    data = json.loads((tmp_path / "privacy.json").read_text())
    assert len(data["rounds"]) == rnd - 1 and data["epsilon"] == pytest.approx(acc.epsilon)


def test_an_unreadable_account_is_refused_not_reset(tmp_path: Path) -> None:
    (tmp_path / "privacy.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable privacy accounting"):
        DeviceAccountant(tmp_path, PrivacyFloors())


def test_the_device_declines_with_the_reason(tmp_path: Path) -> None:
    """Through the device's message handler: a round below the floor is refused on announcement."""
    from edge_client.client import EdgeClient
    from edge_client.config import EdgeConfig

    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    c = EdgeClient(EdgeConfig(device_id="device-0", broker="mqtt://127.0.0.1:1", data=str(tmp_path / "d.jsonl"), student="unused",
                              work_dir=str(tmp_path / "w"), insecure=True, dp_min_noise_multiplier=2.0))
    said: list[tuple[str, str]] = []
    c.publish_status = lambda state, detail="", timeout=60.0: said.append((state, detail))  # type: ignore[method-assign]
    started: list[Any] = []
    c.start_secagg = started.append  # type: ignore[method-assign]
    assert c.handle(topics.bcast("round"), M.encode(_spec(rnd=1, z=1.0)))
    # 0.9999, not 1: the integer grid's rounding adds to the sensitivity, and the device counts it
    assert said == [("declined", "refused: round 1's noise multiplier 0.9999 (with its quorum of 2) is below this device's floor of 2")]
    assert not started
    assert c.handle(topics.bcast("round"), M.encode(_spec(rnd=2, z=3.0)))
    assert len(said) == 1 and len(started) == 1  # above the floor: the device joins


def test_the_dp_builder_clips_the_whole_input_and_keeps_the_rest() -> None:
    spec = _spec()
    sa = spec.secagg
    assert sa is not None and sa.dp is not None
    delta = np.full(DIM, 0.04, np.float32)
    b = update_builder.secure(delta, None, spec.sparse, sa, num_examples=5, rng_seed=3, train_loss=2.0)
    assert b.x is not None and b.x.dtype == np.uint32 and b.x.size == update_codec.masked_dim(spec.sparse, sa) == 8
    # values 0.04 x 6, weight 0.05, loss 0.005: norm 0.1 < 1, nothing clipped, nothing kept back
    assert b.l2_factor == 1.0 and np.allclose(b.sent + b.residual, delta)
    small = dp.DPSpec(mechanism="skellam", l2_clip=0.05, noise_multiplier=1.0, quorum=2, scale=1e4, rotation_seed=bytes(32))
    b = update_builder.secure(delta, None, spec.sparse, M.SecAggSpec(**{**sa.__dict__, "dp": small}), 5, rng_seed=3)
    x = np.concatenate([delta.astype(np.float64), update_codec.tail(1.0, 0.0, sa.clip)])
    assert b.l2_factor == pytest.approx(0.05 / float(np.linalg.norm(x)))
    np.testing.assert_allclose(b.sent, delta * b.l2_factor, rtol=1e-6)
    np.testing.assert_allclose(b.sent + b.residual, delta, atol=1e-7)  # the clipped-off part waits in the residual
    # Decoding this one input gives the clipped vector within the noise: the aggregator's inverse.
    got = dp.decode_sum(b.x, small, 32, DIM + update_codec.TAIL)
    assert np.abs(got - np.concatenate([b.sent, update_codec.tail(b.l2_factor, 0.0, sa.clip)])).max() < 10 * small.sum_std / math.sqrt(2)
    assert sparse.ring_bytes(b.x.size, sa.ring_bits) == 32


@pytest.mark.parametrize(("kw", "msg"), [({"dp_min_noise_multiplier": 0.0}, "dp_min_noise_multiplier must be > 0"),
                                         ({"dp_max_epsilon": -1.0}, "dp_max_epsilon must be > 0"),
                                         ({"dp_delta": 1.0}, "dp_delta must be in")])
def test_bad_dp_floors_are_refused(tmp_path: Path, kw: dict, msg: str) -> None:
    from edge_client.config import EdgeConfig

    with pytest.raises(ConfigError, match=msg):
        EdgeConfig(device_id="device-0", broker="mqtt://127.0.0.1:1", data="d", student="s", insecure=True, **kw)
