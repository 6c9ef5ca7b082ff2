"""The aggregator's message handling without a broker or models: replay, enrollment, typed errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from aggregator import registry
from aggregator.config import AggregatorConfig
from aggregator.server import Aggregator, RoundBook
from shared import messages as M
from tests.specs import dense_spec
from shared import secure, tensors, topics
from shared.crypto import DeviceKeys, generate_keys, save_private_keys, save_public_keys
from shared.datasets import Example, write_jsonl


@pytest.fixture
def agg(tmp_path: Path) -> tuple[Aggregator, DeviceKeys, DeviceKeys]:
    agg_keys, dev_keys = generate_keys(), generate_keys()
    save_private_keys(agg_keys, tmp_path / "agg.key")
    save_public_keys(generate_keys().public, tmp_path / "authority.pub.json")
    registry.enroll(tmp_path / "reg.json", "dev-a", dev_keys.public)
    write_jsonl(tmp_path / "eval.jsonl", [Example("Add.", "1 2", "3", "arith")])
    cfg = AggregatorConfig(broker="mqtt://127.0.0.1:1", student="unused", eval_data=str(tmp_path / "eval.jsonl"),
                           out_dir=str(tmp_path / "out"), keys=str(tmp_path / "agg.key"), registry=str(tmp_path / "reg.json"), authority=str(tmp_path / "authority.pub.json"),
                           quorum=1, min_devices_to_start=1, mode="fedit")
    a = Aggregator(cfg)
    a.digest = "ab" * 32
    a.global_state = {"w": np.zeros(4, np.float32)}
    a.book = RoundBook(rnd=2, participants=["dev-a"], deadline=1e18, spec=dense_spec(2, ["dev-a"], 4))
    return a, agg_keys, dev_keys


def _update(dev: DeviceKeys, agg_keys: DeviceKeys, rnd: int = 2, seq: int = 1, device: str = "dev-a",
            values: np.ndarray | None = None, num_examples: int = 3) -> bytes:
    w = np.full(4, 0.01, np.float32) if values is None else values
    up = M.Update(round=rnd, device_id=device, seq=seq, num_examples=num_examples, steps=1, train_loss=0.5, payload="delta",
                  base_digest="ab" * 32, tensors=tensors.pack({"w": w}))
    return secure.seal_message(up, round=rnd, device_id=device, sender=dev, recipient=agg_keys.public)


def test_accepts_a_sealed_update(agg) -> None:
    a, agg_keys, dev = agg
    a.dispatch(topics.up("dev-a", "update"), _update(dev, agg_keys), 100)
    assert list(a.book.replies) == ["dev-a"] and a.book.rejected == 0
    np.testing.assert_array_equal(a.book.replies["dev-a"].delta["w"], np.full(4, 0.01, np.float32))


def test_a_plain_update_cannot_own_the_mean(agg, caplog) -> None:
    """Issue 22 attack 5, plain rounds: 2^31 - 1 claimed examples and values of 3e38 (only
    finiteness was checked) used to own the mean. Each value is clipped to +-clip, and the weight
    capped at max_weight_examples, before the strategy sees the reply."""
    a, agg_keys, dev = agg
    huge = np.array([3e38, -3e38, 0.02, 1.0], np.float32)
    with caplog.at_level(logging.WARNING):
        a.dispatch(topics.up("dev-a", "update"), _update(dev, agg_keys, values=huge, num_examples=2**31 - 1), 100)
    r = a.book.replies["dev-a"]
    c = a.cfg.clip
    np.testing.assert_array_equal(r.delta["w"], np.array([c, -c, 0.02, c], np.float32))
    assert r.num_examples == a.cfg.max_weight_examples == 1000
    assert "are clipped" in caplog.text and "claims 2147483647 examples" in caplog.text


def test_replay_of_the_same_update_is_rejected(agg, caplog) -> None:
    a, agg_keys, dev = agg
    data = _update(dev, agg_keys)
    a.dispatch(topics.up("dev-a", "update"), data, 100)
    before = dict(a.book.replies)
    with caplog.at_level(logging.WARNING):
        a.dispatch(topics.up("dev-a", "update"), data, 100)
    assert "ReplayError" in caplog.text and "repeated (device, round, seq)" in caplog.text
    assert a.book.replies == before and a.book.rejected == 1


def test_replay_from_a_past_round_is_rejected(agg, caplog) -> None:
    a, agg_keys, dev = agg
    with caplog.at_level(logging.WARNING):
        a.dispatch(topics.up("dev-a", "update"), _update(dev, agg_keys, rnd=1), 100)
    assert "ReplayError: update for round 1; the open round is 2" in caplog.text
    assert not a.book.replies


def test_unenrolled_device_is_ignored_with_a_log_line(agg, caplog) -> None:
    a, agg_keys, _ = agg
    stranger = generate_keys()
    with caplog.at_level(logging.WARNING):
        a.dispatch(topics.up("dev-x", "update"), _update(stranger, agg_keys, device="dev-x"), 100)
    assert "ignoring unenrolled device dev-x" in caplog.text
    assert not a.book.replies


def test_bare_update_refused_when_secure(agg, caplog) -> None:
    a, _, _ = agg
    bare = M.encode(M.Update(round=2, device_id="dev-a", seq=1, num_examples=3, steps=1, train_loss=0.5, payload="delta",
                             base_digest="ab" * 32, tensors=tensors.pack({"w": np.ones(4, np.float32)})))
    with caplog.at_level(logging.WARNING):
        a.dispatch(topics.up("dev-a", "update"), bare, 100)
    assert "SchemaError: bare 'update' message refused" in caplog.text and not a.book.replies


def test_wrong_shape_update_rejected(agg, caplog) -> None:
    a, agg_keys, dev = agg
    up = M.Update(round=2, device_id="dev-a", seq=1, num_examples=3, steps=1, train_loss=0.5, payload="delta",
                  base_digest="ab" * 32, tensors=tensors.pack({"w": np.ones(5, np.float32)}))
    data = secure.seal_message(up, round=2, device_id="dev-a", sender=dev, recipient=agg_keys.public)
    with caplog.at_level(logging.WARNING):
        a.dispatch(topics.up("dev-a", "update"), data, 100)
    assert "expected float32(4,)" in caplog.text and not a.book.replies


def test_insecure_config_requires_devices_and_secure_requires_keys(tmp_path: Path) -> None:
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match="keys and registry are required"):
        AggregatorConfig(broker="mqtt://h:1", student="s", eval_data="e", out_dir="o")
    with pytest.raises(ConfigError, match="devices must list"):
        AggregatorConfig(broker="mqtt://h:1", student="s", eval_data="e", out_dir="o", insecure=True)
