"""The resumable training checkpoint (edge_client/train_checkpoint.py, issue 13): a device killed
while it trains a plain round, and restarted, finishes that round with the update an
uninterrupted run sends; a checkpoint it cannot trust or use costs one log line, never the round
(it starts again from step 0) and never a traceback."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_client import train_checkpoint as tc
from shared import messages as M
from fl_lm.train import TrainState
from shared import secure, tensors, topics
from shared.datasets import Example
from tests.specs import dense_spec

DEV = "d0"
LORA = M.LoraSpec(r=4, alpha=8.0, dropout=0.1, target_modules=("q_proj", "v_proj", "up_proj"))
EXAMPLES = [Example(f"Add {a} and {b}.", "", str(a + b)) for a in range(5) for b in range(4)]
STEPS = 6
CRASH_AT = 3  # checkpoints are written after every step here; the process dies after the third


class Crash(Exception):
    """The process is killed."""


@dataclasses.dataclass
class World:
    root: Path
    keys: dict[str, str]
    student: str
    spec: M.RoundSpec
    ann: bytes  # the signed announcement as it arrives
    sent: np.ndarray  # what an uninterrupted device sends for the round (keep_sent copy)
    crashed: bytes  # the checkpoint file a device killed after step CRASH_AT leaves


def _client(root: Path, keys: dict[str, str], student: str, work: str) -> Any:
    from edge_client.client import EdgeClient
    from edge_client.config import EdgeConfig

    data = root / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"instruction": e.instruction, "input": e.input, "output": e.output}) + "\n"
                                for e in EXAMPLES))
    c = EdgeClient(EdgeConfig(device_id=DEV, broker="mqtt://127.0.0.1:1", data=str(data), student=student,
                              work_dir=str(root / work), keys=keys[DEV], aggregator_keys=keys["aggregator_pub"],
                              keep_sent=True, checkpoint_every_s=0.0))
    c.load_model()
    return c


def _sign(spec: M.RoundSpec, keys: dict[str, str], signer: str = "aggregator") -> bytes:
    from shared.crypto import load_private_keys

    return secure.sign_message(spec, round=spec.round, device_id=DEV, key=load_private_keys(keys[signer]))


def _crash_after(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    real, count = tc.save, {"n": 0}

    def save(work: Path, ck: tc.Checkpoint) -> None:
        real(work, ck)
        count["n"] += 1
        if count["n"] == n:
            raise Crash

    monkeypatch.setattr(tc, "save", save)


@pytest.fixture(scope="module")
def world(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> World:
    from fl_lm.lora import get_adapter
    from fl_sim.run import make_keys

    root = tmp_path_factory.mktemp("train_checkpoint")
    keys = make_keys(root / "keys", [DEV])
    ref = _client(root, keys, tiny_models["student"], "ref")
    start = get_adapter(ref._peft_for(LORA))
    dim = sum(v.size for v in start.values())
    spec = dataclasses.replace(dense_spec(1, [DEV], dim, digest=ref.digest), lora=LORA, local_steps=STEPS,
                               adapter=tensors.pack(start), deadline_s=600.0)
    ann = _sign(spec, keys)
    ref._seen_round(1)
    ref.train_round(spec, ann)
    sent = np.load(root / "ref" / "sent" / "round_0001.npy")

    crashing = _client(root, keys, tiny_models["student"], "crashing")
    crashing._seen_round(1)
    with pytest.MonkeyPatch.context() as mp:
        _crash_after(mp, CRASH_AT)
        with pytest.raises(Crash):
            crashing.train_round(spec, ann)
    crashed = (root / "crashing" / tc.FILE).read_bytes()
    return World(root, keys, tiny_models["student"], spec, ann, sent, crashed)


def _restarted(w: World, work: str, checkpoint: bytes | None, last_round: int = 1, seq: int = 0) -> Any:
    """A device's new process: its durable state as the killed one left it, and the checkpoint."""
    from edge_client import state

    d = w.root / work
    d.mkdir(parents=True)
    state.save(d, state.DeviceState(seq=seq, last_round=last_round))
    if checkpoint is not None:
        (d / tc.FILE).write_bytes(checkpoint)
    return _client(w.root, w.keys, w.student, work)


class Link:
    """Records what the device publishes."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def subscribe(self, filt: str, qos: int = 1) -> None:
        pass

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 60.0) -> int:
        self.sent.append((topic, payload))
        return len(payload)


def _statuses(link: Link, w: World) -> list[tuple[str, str]]:
    from shared.crypto import load_public_keys

    pub = load_public_keys(w.keys[DEV].replace(".key", ".pub.json"))
    return [(st.state, st.detail) for st in (secure.open_message(p, M.DeviceStatus, device_id=DEV, check_round=lambda r: None,
                                                                 recipient=None, sender=pub, sealed=False)
                                             for t, p in link.sent if t.endswith("/status"))]


def test_killed_after_a_checkpoint_and_restarted_it_finishes_the_round_with_the_uninterrupted_update(world: World) -> None:
    ck = tc.load(world.root / "crashing")
    assert ck is not None and ck.state.step == CRASH_AT and ck.header.round == 1 and ck.header.seq == 0
    assert ck.header.spec_digest == tc.spec_digest(world.spec) and ck.header.announcement == world.ann

    c = _restarted(world, "restarted", world.crashed)
    c.link = Link()
    c.on_connected()
    assert _statuses(c.link, world) == [("online", f"resuming round 1 at step {CRASH_AT}")]
    c.resume_round()
    assert _statuses(c.link, world)[1:] == [("training", f"round 1, resumed at step {CRASH_AT}"), ("online", "")]
    assert [t for t, _ in c.link.sent if not t.endswith("/status")] == [topics.up(DEV, "update")]  # one update
    sent = np.load(world.root / "restarted" / "sent" / "round_0001.npy")
    np.testing.assert_allclose(sent, world.sent, rtol=1e-5, atol=1e-7)
    assert np.abs(world.sent).max() > 1e-3  # a real training delta, not zeros
    assert c.seq == 1 and not (world.root / "restarted" / tc.FILE).exists()


def _truncated(w: World) -> bytes:
    return w.crashed[: len(w.crashed) // 2]


def _foreign_safetensors(w: World) -> bytes:
    import torch
    from safetensors.torch import save

    return save({"x": torch.zeros(3)}, metadata={"checkpoint": json.dumps({"format": 1, "round": "one"})})


def _flipped_header(w: World) -> bytes:
    b = bytearray(w.crashed)
    b[10] ^= 0xFF  # inside the JSON header
    return bytes(b)


@pytest.mark.parametrize("damage", [lambda w: b"not a checkpoint", _truncated, _foreign_safetensors, _flipped_header],
                         ids=["garbage", "truncated", "foreign", "flipped-header"])
def test_an_unreadable_checkpoint_costs_one_warning_and_the_round_starts_from_step_0(
        damage: Any, world: World, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    name = f"damaged-{len(list(world.root.glob('damaged-*')))}"
    c = _restarted(world, name, damage(world))
    c.link = Link()
    with caplog.at_level(logging.INFO):
        c.on_connected()  # the restart: nothing to resume, so it is a plain restart
        assert _statuses(c.link, world) == [("online", "started")]
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "ignoring unreadable training checkpoint" in warnings[0].getMessage(), warnings
        assert warnings[0].name == "edge_client.train_checkpoint" and not warnings[0].exc_info
        assert not (world.root / name / tc.FILE).exists()
        # The same file met by training itself (the round announced again): from step 0, one warning.
        (world.root / name / tc.FILE).write_bytes(damage(world))
        caplog.clear()
        _, res = c.train_delta(world.spec, world.ann)
    assert res.resumed_from == 0 and res.steps == STEPS
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_a_checkpoint_of_another_announcement_of_the_round_is_ignored(world: World, monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    import fl_lm.train

    other = dataclasses.replace(world.spec, deadline_s=601.0)  # same round number, another announcement
    assert tc.spec_digest(other) != tc.spec_digest(world.spec)
    c = _restarted(world, "other-digest", world.crashed)
    real, resumed = fl_lm.train.train_lora, []

    def spy(*a: Any, **k: Any) -> Any:
        resumed.append(k.get("resume"))
        return real(*a, **k)

    monkeypatch.setattr(fl_lm.train, "train_lora", spy)
    with caplog.at_level(logging.INFO, logger="edge_client.client"):
        _, res = c.train_delta(other, _sign(other, world.keys))
    assert resumed == [None] and res.resumed_from == 0
    assert any("ignoring the training checkpoint of round 1" in r.getMessage() for r in caplog.records)
    # ... and the same one, for contrast, is resumed.
    (world.root / "other-digest" / tc.FILE).write_bytes(world.crashed)
    c.train_delta(world.spec, world.ann)
    assert resumed[-1] is not None and resumed[-1].step == CRASH_AT


def _swap_announcement(w: World, ann: bytes) -> bytes:
    """The crashed checkpoint with another announcement in it (as someone with the disk could)."""
    d = w.root / f"swap-{len(list(w.root.glob('swap-*')))}"
    d.mkdir()
    (d / tc.FILE).write_bytes(w.crashed)
    ck = tc.load(d)
    assert ck is not None
    tc.save(d, dataclasses.replace(ck, header=dataclasses.replace(ck.header, announcement=ann)))
    return (d / tc.FILE).read_bytes()


@pytest.mark.parametrize(("case", "warns"), [
    ("a later round was accepted", False),
    ("the sequence counter moved (an update was built)", False),
    ("the round's deadline has passed", False),
    ("the stored announcement is signed by someone else", True),
    ("the stored announcement is another genuine one", True),
])
def test_a_restart_does_not_resume_what_it_must_not(case: str, warns: bool, world: World, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    ckpt, last_round, seq = world.crashed, 1, 0
    if case.startswith("a later round"):
        last_round = 2
    elif case.startswith("the sequence"):
        seq = 1
    elif case.startswith("the round's deadline"):
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + world.spec.deadline_s + 1)
    elif "someone else" in case:
        ckpt = _swap_announcement(world, _sign(world.spec, world.keys, signer=DEV))
    else:
        ckpt = _swap_announcement(world, _sign(dataclasses.replace(world.spec, learning_rate=1.0), world.keys))
    name = f"refuse-{len(list(world.root.glob('refuse-*')))}"
    c = _restarted(world, name, ckpt, last_round=last_round, seq=seq)
    c.link = Link()
    with caplog.at_level(logging.INFO, logger="edge_client.client"):
        c.on_connected()
    assert _statuses(c.link, world) == [("online", "started")], case
    assert c._resume is None and not (world.root / name / tc.FILE).exists()
    msgs = [r for r in caplog.records if "not resuming round 1" in r.getMessage()]
    assert len(msgs) == 1 and (msgs[0].levelno == logging.WARNING) == warns, [r.getMessage() for r in msgs]


def test_the_checkpoint_is_removed_once_the_update_is_built_and_when_a_later_round_is_announced(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    c = _restarted(world, "removed", None, last_round=0)
    real, written = tc.save, []

    def save(work: Path, ck: tc.Checkpoint) -> None:
        real(work, ck)
        written.append(ck.state.step)

    def build(*a: Any, **k: Any) -> Any:
        # The update is built (and then sent) only after the checkpoint is gone.
        assert not (world.root / "removed" / tc.FILE).exists()
        return real_flatten(*a, **k)

    from shared import sparse

    real_flatten = sparse.flatten
    monkeypatch.setattr(tc, "save", save)
    monkeypatch.setattr(sparse, "flatten", build)
    c._seen_round(1)
    up = c.train_round(world.spec, world.ann)
    assert written == list(range(1, STEPS)) and up.round == 1  # after every step but the last (checkpoint_every_s = 0)
    assert not (world.root / "removed" / tc.FILE).exists()

    (world.root / "removed" / tc.FILE).write_bytes(world.crashed)
    c._seen_round(2)
    assert not (world.root / "removed" / tc.FILE).exists()


def test_secure_aggregation_rounds_are_never_checkpointed(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    c = _restarted(world, "secure", None, last_round=0)
    monkeypatch.setattr(tc, "save", lambda *a: pytest.fail("a secure round was checkpointed"))
    sa = M.SecAggSpec(node_ids=(1, 2), threshold=2, graph_seed=bytes(32), clip=0.05, ring_bits=32, value_bits=16,
                      weight_norm=20, sketch_block=0)
    spec = dataclasses.replace(world.spec, secagg=sa)
    c.train_delta(spec)  # what masked_round calls
    c.train_delta(spec, _sign(spec, world.keys))  # nor with its announcement: its mask secrets die with the process


def test_the_writer_writes_at_most_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    now, saved = [0.0], []
    monkeypatch.setattr(tc, "save", lambda work, ck: saved.append(ck.state.step))
    header = tc.Header(round=1, spec_digest="", run_key="", seq=0, received_at=0.0, deadline_s=1.0, announcement=b"")
    w = tc.Writer(Path("unused"), header, every_s=30.0, clock=lambda: now[0])
    for step in range(1, 20):
        now[0] += 7.0  # a 7 s step
        w(step, lambda: TrainState(step=step, params={}, moments={}, counts={}, rng={}, losses=()))
    assert saved == [5, 10, 15]  # at 35, 70 and 105 s: the first step ending 30 s or more after the last write
