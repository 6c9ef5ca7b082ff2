"""The device's round loop: wait for a RoundSpec naming us, train, publish the update."""

from __future__ import annotations

import logging
import time
import zlib
from typing import Any

from edge_client.budget import BudgetExceeded, check_model, local_steps
from edge_client.config import EdgeConfig
from shared import messages as M
from shared import tensors, topics
from shared.datasets import Example, load_file
from shared.errors import ProtocolError
from shared.profiles import load_profile

log = logging.getLogger(__name__)


class EdgeClient:
    def __init__(self, cfg: EdgeConfig) -> None:
        self.cfg = cfg
        self.profile = load_profile(cfg.profile)
        self.examples: list[Example] = load_file(cfg.data)
        self.seq = 0
        self._model: Any = None
        self._tok: Any = None
        self._peft: Any = None
        self._lora: M.LoraSpec | None = None
        self.digest = ""
        self.link: Any = None
        self.last_round = -1

    # -- model ---------------------------------------------------------------------------------
    def load_model(self) -> None:
        import torch

        from fl_lm.loading import base_digest, load_model, load_tokenizer, param_count

        if self.profile.torch_threads:
            torch.set_num_threads(self.profile.torch_threads)
        self._tok = load_tokenizer(self.cfg.student)
        self._model = load_model(self.cfg.student)
        check_model(self.profile, param_count(self._model))
        self.digest = base_digest(self._model)
        log.info("%s: student %s loaded (%d params, digest %s), %d private examples",
                 self.cfg.device_id, self.cfg.student, param_count(self._model), self.digest[:12], len(self.examples))

    def _peft_for(self, spec: M.LoraSpec) -> Any:
        from fl_lm.lora import attach_lora

        if self._peft is None or self._lora != spec:
            if self._peft is not None:
                self._model = self._peft.unload()
            self._peft = attach_lora(self._model, spec)
            self._lora = spec
        return self._peft

    def train_round(self, spec: M.RoundSpec) -> M.Update:
        """Pure with respect to the network: RoundSpec in, Update out."""
        from fl_lm.lora import get_adapter, set_adapter, sub
        from fl_lm.train import train_lora

        if spec.base_digest != self.digest:
            raise BudgetExceeded(f"round {spec.round} is for base {spec.base_digest[:12]}, this device has {self.digest[:12]}")
        steps = local_steps(self.profile, spec)
        peft = self._peft_for(spec.lora)
        start = tensors.unpack(spec.adapter)
        set_adapter(peft, start)
        t0 = time.monotonic()
        res = train_lora(peft, self._tok, self.examples, steps=steps, lr=spec.learning_rate,
                         batch_size=self.profile.batch_size, max_len=self.profile.max_seq_len,
                         seed=spec.seed + zlib.crc32(self.cfg.device_id.encode()) % 10_000)
        delta = sub(get_adapter(peft), start)
        log.info("%s: round %d trained %d steps in %.1fs, loss %.3f -> %.3f",
                 self.cfg.device_id, spec.round, res.steps, time.monotonic() - t0, res.first_loss, res.last_loss)
        self.seq += 1
        return M.Update(round=spec.round, device_id=self.cfg.device_id, seq=self.seq, num_examples=len(self.examples),
                        steps=res.steps, train_loss=res.mean_loss, payload="delta", base_digest=self.digest,
                        tensors=tensors.pack(delta))

    # -- network -------------------------------------------------------------------------------
    def _status(self, state: str, detail: str = "") -> bytes:
        return M.encode(M.DeviceStatus(device_id=self.cfg.device_id, state=state, profile=self.profile.name,  # type: ignore[arg-type]
                                       num_examples=len(self.examples), detail=detail))

    def connect(self) -> None:
        from fl_mqtt.link import MqttLink

        c = self.cfg
        self.link = MqttLink(c.device_id, c.broker, username=c.username, password=c.password, ca_file=c.ca_file,
                             protocol=c.protocol, will=(topics.up(c.device_id, "status"), self._status("offline", "connection lost")))
        self.link.connect(c.connect_timeout_s)
        self.link.subscribe(topics.bcast_filter())
        self.link.subscribe(topics.down_filter(c.device_id))
        self.link.publish(topics.up(c.device_id, "status"), self._status("online"), retain=True)

    def handle(self, topic: str, payload: bytes) -> bool:
        """Process one incoming message; returns False when the device should stop."""
        try:
            msg = M.decode(payload)
        except ProtocolError as e:
            log.warning("%s: rejected message on %s: %s: %s", self.cfg.device_id, topic, type(e).__name__, e)
            return True
        if isinstance(msg, M.Shutdown):
            log.info("%s: aggregator shut down (%s)", self.cfg.device_id, msg.reason)
            return False
        if isinstance(msg, M.RoundSpec):
            if self.cfg.device_id not in msg.participants:
                return True
            if msg.round <= self.last_round:
                log.warning("%s: ignoring RoundSpec for past round %d", self.cfg.device_id, msg.round)
                return True
            self.last_round = msg.round
            self.link.publish(topics.up(self.cfg.device_id, "status"), self._status("training", f"round {msg.round}"), retain=True)
            try:
                update = self.train_round(msg)
            except BudgetExceeded as e:
                log.warning("%s: declining round %d: %s", self.cfg.device_id, msg.round, e)
                self.link.publish(topics.up(self.cfg.device_id, "status"), self._status("declined", str(e)), retain=True)
                return True
            n = self.link.publish(topics.up(self.cfg.device_id, "update"), M.encode(update))
            log.info("%s: round %d update sent (%d bytes on the wire)", self.cfg.device_id, msg.round, n)
            self.link.publish(topics.up(self.cfg.device_id, "status"), self._status("online"), retain=True)
        return True

    def run(self) -> None:
        self.load_model()
        self.connect()
        idle_since = time.monotonic()
        try:
            while True:
                inc = self.link.get(timeout=1.0)
                if inc is None:
                    if self.cfg.idle_timeout_s and time.monotonic() - idle_since > self.cfg.idle_timeout_s:
                        log.warning("%s: no message for %.0fs, exiting", self.cfg.device_id, self.cfg.idle_timeout_s)
                        break
                    continue
                idle_since = time.monotonic()
                if not self.handle(inc.topic, inc.payload):
                    break
        finally:
            try:
                self.link.publish(topics.up(self.cfg.device_id, "status"), self._status("offline", "stopped"), retain=True, timeout=5)
            except Exception as e:  # best effort on the way out; the will covers a dead link
                log.debug("could not publish offline status: %s", e)
            self.link.close()


