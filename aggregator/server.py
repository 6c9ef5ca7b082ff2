"""The aggregator's round loop: announce, collect until quorum or deadline, aggregate, evaluate.

Network messages arrive on a queue (``fl_mqtt``) and are handled here, on one thread, in order.
Anything that fails to decode or validate is logged with its typed error and the round goes on.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aggregator import checkpoint
from aggregator.config import AggregatorConfig
from aggregator.strategy import FedAvg, Reply
from shared import messages as M
from shared import tensors, topics
from shared.datasets import Example, load_file
from shared.errors import ProtocolError, ReplayError, SchemaError

log = logging.getLogger(__name__)


@dataclass
class RoundBook:
    """What happened in one round, as it happens."""

    rnd: int
    participants: list[str]
    deadline: float
    replies: dict[str, Reply] = field(default_factory=dict)
    train_loss: dict[str, float] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    rejected: int = 0

    def waiting_for(self) -> set[str]:
        return set(self.participants) - set(self.replies) - self.dropped


def load_eval(path: str, max_per_family: int) -> list[Example]:
    """A file, or a directory whose files are one family each (named after the file)."""
    p = Path(path)
    files = sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p]
    out: list[Example] = []
    for f in files:
        exs = load_file(f, family=f.stem if p.is_dir() else None)
        by_fam: dict[str, int] = {}
        for e in exs:
            if by_fam.get(e.family, 0) < max_per_family:
                out.append(e)
                by_fam[e.family] = by_fam.get(e.family, 0) + 1
    if not out:
        raise SchemaError(f"no evaluation examples in {path}")
    return out


class Aggregator:
    def __init__(self, cfg: AggregatorConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.strategy = FedAvg(server_lr=cfg.server_lr, clients_per_round=cfg.clients_per_round, seed=cfg.seed)
        self.enrolled = set(cfg.devices)
        self.online: dict[str, int] = {}  # device -> num_examples it reported
        self.eval_examples = load_eval(cfg.eval_data, cfg.eval_max_per_family)
        self.lora = M.LoraSpec(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules)
        self.book: RoundBook | None = None
        self.link: Any = None
        self.global_state: dict[str, np.ndarray] = {}
        self.round = 0
        self._ignored: set[str] = set()

    # -- model ---------------------------------------------------------------------------------
    def load_model(self) -> None:
        import torch

        from fl_lm.loading import base_digest, load_model, load_tokenizer
        from fl_lm.lora import attach_lora, get_adapter, set_adapter

        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        self.tok = load_tokenizer(self.cfg.student)
        base = load_model(self.cfg.student)
        self.digest = base_digest(base)
        self.peft = attach_lora(base, self.lora, seed=self.cfg.seed)
        st = checkpoint.load_state(self.out)
        if st is not None:
            self.global_state = checkpoint.load_adapter(st.checkpoint)
            set_adapter(self.peft, self.global_state)
            self.round = st.round
            log.info("resumed from %s (round %d)", st.checkpoint, st.round)
        else:
            self.global_state = get_adapter(self.peft)
            checkpoint.save(self.out, 0, self.peft)
        log.info("student %s (digest %s), %d eval examples", self.cfg.student, self.digest[:12], len(self.eval_examples))

    def evaluate(self) -> dict[str, Any]:
        from fl_lm.evaluate import evaluate, mean_exact_match, mean_loss
        from fl_lm.lora import set_adapter

        set_adapter(self.peft, self.global_state)
        scores = evaluate(self.peft, self.tok, self.eval_examples, self.cfg.max_seq_len, self.cfg.eval_batch_size)
        return {
            "eval": {f: {"n": s.n, "loss": s.loss, "exact_match": s.exact_match} for f, s in scores.items()},
            "mean_loss": mean_loss(scores),
            "mean_exact_match": mean_exact_match(scores),
        }

    # -- network -------------------------------------------------------------------------------
    def connect(self) -> None:
        from fl_mqtt.link import MqttLink

        c = self.cfg
        self.link = MqttLink("aggregator", c.broker, username=c.username, password=c.password, ca_file=c.ca_file, protocol=c.protocol)
        self.link.connect()
        self.link.subscribe(topics.up_filter())

    def pump(self, until: float) -> None:
        """Handle incoming messages until ``until`` (monotonic) or until the round needs nobody else."""
        while time.monotonic() < until:
            if self.book is not None and not self.book.waiting_for():
                return
            inc = self.link.get(timeout=min(0.5, max(0.01, until - time.monotonic())))
            if inc is not None:
                self.dispatch(inc.topic, inc.payload, inc.wire_bytes)

    def dispatch(self, topic: str, payload: bytes, wire_bytes: int) -> None:
        try:
            t = topics.parse(topic)
            if t.direction != topics.UP or t.device_id is None:
                raise SchemaError(f"not an upload topic: {topic}")
            if t.device_id not in self.enrolled:
                if t.device_id not in self._ignored:
                    log.warning("ignoring unenrolled device %s", t.device_id)
                    self._ignored.add(t.device_id)
                return
            if not payload and t.kind == "status":
                return  # a cleared retained message
            if self.book is not None and t.device_id in self.book.participants:
                self.book.bytes_up[t.device_id] = self.book.bytes_up.get(t.device_id, 0) + wire_bytes
            if t.kind == "status":
                self.on_status(t.device_id, M.decode(payload, expect=M.DeviceStatus))  # type: ignore[arg-type]
            elif t.kind == "update":
                self.on_update(t.device_id, payload)
            else:
                raise SchemaError(f"unknown upload kind {t.kind!r}")
        except ProtocolError as e:
            if self.book is not None:
                self.book.rejected += 1
            log.warning("rejected message on %s: %s: %s", topic, type(e).__name__, e)

    def on_status(self, device: str, st: M.DeviceStatus) -> None:
        if st.device_id != device:
            raise ReplayError(f"status for {st.device_id} arrived on {device}'s topic")
        if st.state == "offline":
            self.online.pop(device, None)
            if self.book is not None and device in self.book.waiting_for():
                self.book.dropped.add(device)
                log.warning("round %d: device %s went offline (%s); treating it as a dropout", self.book.rnd, device, st.detail)
        elif st.state == "declined":
            if self.book is not None and device in self.book.waiting_for():
                self.book.dropped.add(device)
                log.warning("round %d: device %s declined: %s", self.book.rnd, device, st.detail)
        else:
            if device not in self.online:
                log.info("device %s online (%s, %d examples)", device, st.profile, st.num_examples)
            self.online[device] = st.num_examples

    def on_update(self, device: str, payload: bytes) -> None:
        up = M.decode(payload, expect=M.Update)
        assert isinstance(up, M.Update)
        b = self.book
        if up.device_id != device:
            raise ReplayError(f"update for {up.device_id} arrived on {device}'s topic")
        if b is None or up.round != b.rnd:
            raise ReplayError(f"update from {device} for round {up.round}; current round is {b.rnd if b else 'none'}")
        if device not in b.participants:
            raise ReplayError(f"{device} is not a participant of round {b.rnd}")
        if device in b.replies:
            raise ReplayError(f"second update from {device} in round {b.rnd}")
        if up.base_digest != self.digest:
            raise SchemaError(f"update from {device} is for base {up.base_digest[:12]}")
        if up.num_examples < 1:
            raise SchemaError(f"update from {device} claims {up.num_examples} examples")
        delta = tensors.unpack(up.tensors)
        if set(delta) != set(self.global_state):
            raise SchemaError(f"update from {device} has {len(delta)} tensors, expected the {len(self.global_state)} of the adapter")
        for k, v in delta.items():
            if v.shape != self.global_state[k].shape or v.dtype != np.float32:
                raise SchemaError(f"update from {device}: tensor {k} is {v.dtype}{v.shape}, expected float32{self.global_state[k].shape}")
            if not np.isfinite(v).all():
                raise SchemaError(f"update from {device}: tensor {k} has non-finite values")
        b.replies[device] = Reply(device, up.num_examples, delta)
        b.train_loss[device] = up.train_loss
        if self.cfg.keep_received:
            d = self.out / "received" / f"round_{b.rnd:04d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{device}.msgpack").write_bytes(payload)
        log.info("round %d: update from %s (%d examples, %d/%d)", b.rnd, device, up.num_examples, len(b.replies), len(b.participants))

    # -- rounds --------------------------------------------------------------------------------
    def wait_for_devices(self) -> None:
        deadline = time.monotonic() + self.cfg.wait_for_devices_s
        while len(self.online) < self.cfg.min_devices_to_start and time.monotonic() < deadline:
            inc = self.link.get(timeout=0.5)
            if inc is not None:
                self.dispatch(inc.topic, inc.payload, inc.wire_bytes)
        if len(self.online) < self.cfg.min_devices_to_start:
            log.warning("only %d of %d devices online after %.0fs; starting anyway", len(self.online), self.cfg.min_devices_to_start, self.cfg.wait_for_devices_s)

    def run_round(self, rnd: int) -> dict[str, Any]:
        from fl_lm.lora import set_adapter

        t0 = time.monotonic()
        participants = self.strategy.configure_round(rnd, list(self.online))
        spec = M.RoundSpec(round=rnd, participants=tuple(participants), local_steps=self.cfg.local_steps,
                           learning_rate=self.cfg.learning_rate, lora=self.lora, base_digest=self.digest,
                           deadline_s=self.cfg.round_timeout_s, seed=self.cfg.seed * 100_003 + rnd,
                           adapter=tensors.pack(self.global_state))
        self.book = b = RoundBook(rnd, participants, time.monotonic() + self.cfg.round_timeout_s)
        data = M.encode(spec)
        for d in participants:
            b.bytes_down[d] = self.link.publish(topics.down(d, "round"), data)
        log.info("round %d: announced to %s (%d bytes each)", rnd, participants, len(data))
        self.pump(b.deadline)
        self.book = None
        rec: dict[str, Any] = {"round": rnd, "participants": participants, "received": sorted(b.replies),
                               "dropped": sorted(set(participants) - set(b.replies)), "rejected_messages": b.rejected,
                               "bytes_up": b.bytes_up, "bytes_down": b.bytes_down, "train_loss": b.train_loss,
                               "wire_bytes_note": "MQTT PUBLISH packets (header+topic+payload), excluding TCP/TLS and acks"}
        if len(b.replies) < self.cfg.quorum:
            log.error("round %d abandoned: %d of %d updates received, quorum is %d; global model unchanged",
                      rnd, len(b.replies), len(participants), self.cfg.quorum)
            rec["status"] = "abandoned"
        else:
            self.global_state = self.strategy.aggregate(self.global_state, list(b.replies.values()))
            set_adapter(self.peft, self.global_state)
            checkpoint.save(self.out, rnd, self.peft)
            rec["status"] = "ok"
        self.round = rnd
        rec.update(self.evaluate())
        rec["time_s"] = round(time.monotonic() - t0, 3)
        return rec

    def write_metrics(self, rec: dict[str, Any]) -> None:
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def run(self) -> None:
        self.load_model()
        self.connect()
        try:
            if self.round == 0:
                rec = {"round": 0, "status": "baseline", "participants": [], "received": [], "dropped": [],
                       "bytes_up": {}, "bytes_down": {}, **self.evaluate()}
                self.write_metrics(rec)
                log.info("round 0 (before training): mean held-out loss %.4f", rec["mean_loss"])
            self.wait_for_devices()
            for rnd in range(self.round + 1, self.cfg.rounds + 1):
                if len(self.online) < self.cfg.quorum:
                    self.wait_for_devices()
                rec = self.run_round(rnd)
                self.write_metrics(rec)
                em = rec["mean_exact_match"]
                log.info("round %d %s: %d/%d updates, mean held-out loss %.4f, exact match %s",
                         rnd, rec["status"], len(rec["received"]), len(rec["participants"]), rec["mean_loss"],
                         "n/a" if em is None else f"{em:.3f}")
        finally:
            try:
                self.link.publish(topics.bcast("shutdown"), M.encode(M.Shutdown(reason="done")), timeout=5)
            except Exception as e:  # best effort; devices also have an idle timeout
                log.debug("shutdown broadcast failed: %s", e)
            self.link.close()
