"""The device's round loop: wait for a RoundSpec naming us, train, publish the update.

With secure aggregation the round is a short conversation before training: advertise keys, share
mask seeds with neighbours (relayed, sealed pairwise), then train and send the masked vector,
then answer the aggregator's unmask request. The update itself is built by ``update_builder``.

With security on (the default) every RoundSpec must verify under the pinned aggregator key and be
for a round after the last one seen; every update is sealed to the aggregator and signed; every
status is signed. Large payloads travel in chunks; uploads are journaled so a restarted device
resumes an interrupted one instead of starting over. Local training of a plain round (secure
aggregation off) is checkpointed (``train_checkpoint``), so a device restarted before its round's
deadline continues that round where it stopped instead of dropping out of it.
"""

from __future__ import annotations

import logging
import shutil
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_client import state as device_state
from edge_client import train_checkpoint, update_builder
from edge_client.budget import BudgetExceeded, Declined, NonFiniteUpdate, local_steps
from edge_client.privacy import DeviceAccountant, PrivacyFloors
from edge_client.config import EdgeConfig
from shared import messages as M
from shared import authority, secagg, secure, sparse, tensors, topics, update_codec
from shared.secagg import hardened
from shared.secagg.floors import BelowFloor, Floors
from shared.chunking import Chunk, ChunkPolicy, Manifest, Reassembler, UploadJournal, decode_frame
from shared.crypto import load_private_keys, load_public_keys
from shared.crypto import signed_payload as crypto_payload
from shared.datasets import Example, load_file
from shared.ledger import Ledger
from shared.errors import ConfigError, ProtocolError, ReplayError, SchemaError
from shared.profiles import load_profile

log = logging.getLogger(__name__)

# The detail of an "online" status: a new process, or the same one back after a broker outage.
STARTED, RECONNECTED = M.STARTED, M.RECONNECTED
LEDGER_FILE = "ledger.jsonl"  # under the work dir: what left this device (shared.ledger)
RELEASE_STAGING = "release-staging"  # under the work dir: a release's files as received, before install


class EdgeClient:
    def __init__(self, cfg: EdgeConfig) -> None:
        self.cfg = cfg
        self.profile = load_profile(cfg.profile)
        self.examples: list[Example] = load_file(cfg.data, encoding=cfg.data_encoding)
        self.work = Path(cfg.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.keys = load_private_keys(cfg.keys) if cfg.keys and not cfg.insecure else None
        self.agg_pub = load_public_keys(cfg.aggregator_keys) if cfg.aggregator_keys and not cfg.insecure else None
        # Hardened secure aggregation: the pinned fleet authority and this device's certificate.
        self.authority = load_public_keys(cfg.authority_keys) if cfg.authority_keys and not cfg.insecure else None
        self.cert = authority.load(cfg.cert).blob if cfg.cert and not cfg.insecure else b""
        if cfg.insecure:
            log.warning("%s: SECURITY OFF (insecure = true): updates go unencrypted and unsigned, "
                        "announcements are not verified. Debug use only.", cfg.device_id)
        # Floors the aggregator's round spec cannot lower (shared.secagg.floors): the profile's,
        # with the config's where it sets them.
        self.floors = cfg.floors(Floors(self.profile.secagg_min_cohort, self.profile.secagg_min_threshold,
                                        self.profile.secagg_colluders))
        if self.authority is not None and cfg.allow_plain_rounds:
            log.warning("%s: allow_plain_rounds = true: this device takes rounds WITHOUT secure aggregation, in which "
                        "the aggregator sees its update", cfg.device_id)
        self.policy = ChunkPolicy(max_message_bytes=cfg.chunk_bytes)
        # Every message this device seals or signs for sending, hash-chained and signed, for an
        # auditor (shared.ledger; `fl-audit verify WORK_DIR/ledger.jsonl --key PUBLIC_KEY`).
        self.ledger = Ledger(self.work / LEDGER_FILE, cfg.device_id, self.keys) if self.keys is not None else None
        self.outbox = UploadJournal(self.work / "outbox")
        self.downloads = Reassembler(max_transfers=4, max_transfer_bytes=1 << 30, max_total_bytes=1 << 30)
        # Sequence number and last round seen survive a restart (edge_client/state.py).
        self._state = device_state.load(self.work)
        self._model: Any = None
        self._release_id: str | None = None  # the current release's id, read once (current_release_id)
        self._tok: Any = None
        self._peft: Any = None
        self._lora: M.LoraSpec | None = None
        self._checkpointing = False
        self.placement: Any = None  # fl_lm.device.Placement: where and at which dtype the student runs
        self.shape: Any = None  # edge_client.planner.ModelShape of the student, from its config
        self._stop_reason = "stopped"  # the detail of the "offline" status this process leaves with
        self.digest = ""
        self.link: Any = None
        # Secure-aggregation round in progress: its spec and the protocol state between stages.
        self.sa_spec: M.RoundSpec | None = None
        self.sa_state: hardened.HardenedClient | None = None
        self.sa_ident: hardened.Identity | None = None
        self.sa_built: tuple[Any, Any] | None = None  # this round's input, built, waiting for its mask peers
        self.residual = self._load_residual()
        # This device's own DP accounting and floors (edge_client/privacy.py), persisted in the work dir.
        self._ledger_note: dict[int, dict] = {}  # round -> clip, noise and epsilon, for the masked update's ledger entry
        self.privacy = DeviceAccountant(self.work, PrivacyFloors(cfg.dp_min_noise_multiplier, cfg.dp_max_epsilon, cfg.dp_delta))
        self.last_train: Any = None  # the last round's fl_lm.train.TrainResult (stays on the device)
        # A round this process continues from its training checkpoint once connected (spec, announcement, step).
        self._resume: tuple[M.RoundSpec, bytes, int] | None = None

    # -- durable counters ------------------------------------------------------------------------
    @property
    def seq(self) -> int:
        return self._state.seq

    @property
    def last_round(self) -> int:
        return self._state.last_round

    def _next_seq(self) -> int:
        # Written before use: a crash after this wastes a number, never reuses one.
        self._state = replace(self._state, seq=self._state.seq + 1)
        device_state.save(self.work, self._state)
        return self._state.seq

    def _seen_round(self, rnd: int) -> None:
        self._state = replace(self._state, last_round=rnd)
        device_state.save(self.work, self._state)
        if train_checkpoint.discard(self.work):
            log.info("%s: round %d announced; the training checkpoint of an earlier round is discarded", self.cfg.device_id, rnd)

    # -- error feedback ------------------------------------------------------------------------
    def _load_residual(self) -> np.ndarray | None:
        p = self.work / "residual.npy"
        if not p.exists():
            return None
        try:
            r = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            log.warning("%s: ignoring unreadable residual %s: %s", self.cfg.device_id, p, e)
            return None
        if r.ndim != 1:
            return None
        if not np.isfinite(r).all():
            # One NaN in it would poison every later update; it is delayed mass, so dropping it
            # loses only what was not sent yet. Removed, so it is never raised again.
            log.warning("%s: the error-feedback residual %s holds %d non-finite values: dropped, a fresh one starts",
                        self.cfg.device_id, p, int(r.size - np.count_nonzero(np.isfinite(r))))
            p.unlink(missing_ok=True)
            return None
        return r.astype(np.float32)

    def _save_residual(self, r: np.ndarray) -> None:
        tmp = self.work / "residual.npy.tmp"
        with tmp.open("wb") as f:
            np.save(f, r, allow_pickle=False)
        tmp.replace(self.work / "residual.npy")
        self.residual = r

    # -- model ---------------------------------------------------------------------------------
    def load_model(self) -> None:
        """Check, plan and load the student, before connecting: what cannot work here is refused
        in one line (a ConfigError) and nothing is published."""
        import torch

        from fl_lm import device
        from fl_lm.loading import base_digest, check_model_source, digest_reads_files, load_model, load_tokenizer

        from edge_client import environment, planner

        me, src, prof = self.cfg.device_id, self.cfg.student, self.profile
        check_model_source(src, "student")  # one line naming what is wrong, not a hub error
        for w in environment.check(prof):
            log.warning("%s: %s", me, w)
        if prof.torch_threads:
            torch.set_num_threads(prof.torch_threads)
        # One policy for where the student runs (fl_lm.device): a profile with a GPU that finds
        # none says so once and runs on the CPU; an explicit cuda that is absent is refused.
        expect = f"{me}: profile {prof.name} (sm_{prof.compute_capability.replace('.', '')})" if prof.compute_capability else ""
        self.placement = pl = device.resolve(self.cfg.device, self.cfg.dtype, expect_gpu=expect)
        # Planned from the config alone, at the dtype training will run at, before a byte of the
        # model is allocated: a base that cannot fit even the smallest setting is refused here,
        # in one line. The planner is the only size limit.
        self.shape = planner.shape_of(src)
        planner.plan(prof, self.shape, planner.SMALLEST_LORA, pl)
        self._tok = load_tokenizer(src)
        bits = prof.quant_bits
        if bits < 16:
            from fl_lm.quantized import load_quantized

            self._model = load_quantized(src, bits, placement=pl)
            self.digest = base_digest(self._model, src)
        else:
            # The frozen base at the compute dtype (half the memory on a GPU, as planned); the
            # digest must be the aggregator's float32 one, so a base whose digest is taken from
            # the weights in memory (not from its files) is loaded in float32 and cast after.
            from_files = digest_reads_files(src)
            self._model = load_model(src, dtype=pl.weights_dtype if from_files else "float32")
            self.digest = base_digest(self._model, src)
            self._model = device.place(self._model.to(getattr(torch, pl.weights_dtype)), pl)
        log.info("%s: student %s loaded (%d params, digest %s) on %s (%s), %d private examples",
                 me, src, self.shape.params, self.digest[:12], pl.describe(), pl.reason, len(self.examples))

    def _peft_for(self, spec: M.LoraSpec) -> Any:
        from fl_lm.lora import attach_lora

        if self._peft is None or self._lora != spec:
            if self._peft is not None:
                self._model = self._peft.unload()
            self._peft = attach_lora(self._model, spec)
            self._lora = spec
        return self._peft

    def train_delta(self, spec: M.RoundSpec, announcement: bytes | None = None) -> tuple[dict[str, np.ndarray], Any]:
        """Local LoRA training from the round's global adapter; returns (delta, training result).

        With the round's ``announcement`` as it arrived (plain rounds), training is checkpointed,
        and continues from a checkpoint of this very round and run if there is one.
        """
        import torch

        from fl_lm.lora import get_adapter, set_adapter, sub
        from fl_lm.train import train_lora

        if spec.base_digest != self.digest:
            raise Declined(f"stale base: round {spec.round} is for base {spec.base_digest[:12]}, this device has {self.digest[:12]}")
        from edge_client import planner

        steps = local_steps(self.profile, spec)
        try:
            p = planner.plan(self.profile, self.shape, spec.lora, self.placement)  # the largest setting that fits, or decline
        except planner.PlanError as e:
            raise BudgetExceeded(f"round {spec.round} (LoRA r {spec.lora.r}) {e}") from None
        s = p.setting
        if s.checkpointing != self._checkpointing:
            if s.checkpointing:
                from fl_lm.quantized import enable_checkpointing

                enable_checkpointing(self._model)
            else:
                self._model.gradient_checkpointing_disable()
            self._checkpointing = s.checkpointing
        peft = self._peft_for(spec.lora)
        start = tensors.unpack(spec.adapter)
        set_adapter(peft, start)
        seed = spec.seed + zlib.crc32(self.cfg.device_id.encode()) % 10_000
        resume, writer = None, None
        if announcement is not None and spec.secagg is None:
            header = train_checkpoint.Header(
                round=spec.round, spec_digest=train_checkpoint.spec_digest(spec), seq=self.seq, received_at=time.time(),
                run_key=train_checkpoint.run_key(steps=steps, batch_size=s.batch, max_len=s.seq, lr=spec.learning_rate,
                                                 seed=seed, examples=self.examples),
                deadline_s=spec.deadline_s, announcement=announcement)
            ck = self._checkpoint_of(header)
            if ck is not None:
                resume, header = ck.state, ck.header
            writer = train_checkpoint.Writer(self.work, header, self.cfg.checkpoint_every_s)
        t0 = time.monotonic()
        try:
            res = train_lora(peft, self._tok, self.examples, steps=steps, lr=spec.learning_rate,
                             batch_size=s.batch, max_len=s.seq, seed=seed, resume=resume, after_step=writer)
        except torch.OutOfMemoryError as e:  # a GPU's allocator says so; a CPU's kernel kills instead
            torch.cuda.empty_cache()
            first = (str(e).strip().splitlines() or ["out of memory"])[0][:200]
            raise Declined(f"round {spec.round}: out of GPU memory at batch {s.batch} x seq {s.seq} (planned peak "
                           f"{p.predicted['peak'] / (1 << 30):.2f} GB of {p.budget / (1 << 30):.2f}): {first}") from None
        # From here the update is built from the trained adapter, and the outbox carries it: a
        # restart must not train this round again (its update may be on its way).
        train_checkpoint.discard(self.work)
        log.info("%s: round %d trained %d steps in %.1fs%s, loss %.3f -> %.3f", self.cfg.device_id, spec.round, res.steps,
                 time.monotonic() - t0, f" (resumed at step {res.resumed_from})" if res.resumed_from else "",
                 res.first_loss, res.last_loss)
        delta = sub(get_adapter(peft), start)
        bad = sum(int(np.size(v) - np.count_nonzero(np.isfinite(v))) for v in delta.values())
        if bad:
            # Checked before clipping and masking: once masked, nobody could tell, and the sum is poisoned.
            raise NonFiniteUpdate(f"non-finite update: {bad} of {sum(np.size(v) for v in delta.values())} values are NaN or Inf")
        return delta, res

    def _checkpoint_of(self, header: train_checkpoint.Header) -> train_checkpoint.Checkpoint | None:
        """The stored checkpoint if it is of this round's announcement and of this run, else None."""
        ck = train_checkpoint.load(self.work)
        if ck is None:
            return None
        me, h = self.cfg.device_id, ck.header
        if (h.round, h.spec_digest) != (header.round, header.spec_digest):
            log.info("%s: ignoring the training checkpoint of round %d (announcement %s); round %d's is %s",
                     me, h.round, h.spec_digest[:12], header.round, header.spec_digest[:12])
            return None
        if h.run_key != header.run_key:
            log.warning("%s: not resuming round %d from its checkpoint: the data or training settings changed; "
                        "starting from step 0", me, h.round)
            return None
        return ck

    def _flat(self, spec: M.RoundSpec, delta: dict[str, np.ndarray]) -> np.ndarray:
        flat = sparse.flatten(delta, sparse.Layout.from_tensors(delta))
        if flat.size != spec.sparse.dim:
            raise SchemaError(f"round {spec.round}: adapter has {flat.size} coordinates, the spec says {spec.sparse.dim}")
        if self.residual is not None and self.residual.shape != flat.shape:
            log.warning("%s: residual shape %s no longer matches the adapter; starting a fresh one", self.cfg.device_id, self.residual.shape)
            self.residual = None
        return flat

    def _keep(self, rnd: int, sent: np.ndarray) -> None:
        if self.cfg.keep_sent:
            d = self.work / "sent"
            d.mkdir(parents=True, exist_ok=True)
            np.save(d / f"round_{rnd:04d}.npy", sent, allow_pickle=False)

    def train_round(self, spec: M.RoundSpec, announcement: bytes | None = None) -> M.Update | M.SparseUpdate:
        """Secure aggregation off. Pure with respect to the network: RoundSpec in, update out
        (``announcement``: see ``train_delta``)."""
        delta, res = self.train_delta(spec, announcement)
        seq = self._next_seq()
        common = dict(round=spec.round, device_id=self.cfg.device_id, seq=seq, num_examples=len(self.examples),
                      steps=res.steps, train_loss=res.mean_loss, base_digest=self.digest)
        if spec.sparse.method == "dense":
            self._keep(spec.round, sparse.flatten(delta, sparse.Layout.from_tensors(delta)))
            return M.Update(payload="delta", tensors=tensors.pack(delta), **common)  # type: ignore[arg-type]
        built = update_builder.plain(self._flat(spec, delta), self.residual, spec.sparse)
        self._save_residual(built.residual)
        self._keep(spec.round, built.sent)
        return M.SparseUpdate(encoding=built.encoding, values=built.values, **common)  # type: ignore[arg-type]

    # -- wire ----------------------------------------------------------------------------------
    def _wrap(self, msg: M.Message, rnd: int, sealed: bool) -> bytes:
        if self.cfg.insecure:
            return M.encode(msg)
        assert self.keys is not None and self.agg_pub is not None
        if sealed:
            wire = secure.seal_message(msg, round=rnd, device_id=self.cfg.device_id, sender=self.keys, recipient=self.agg_pub)
        else:
            wire = secure.sign_message(msg, round=rnd, device_id=self.cfg.device_id, key=self.keys)
        # Recorded (and fsync'ed) before the bytes go to the broker: what left is always in the ledger.
        if self.ledger is not None:
            note = self._ledger_note.pop(rnd, None) if isinstance(msg, M.MaskedUpdate) else None
            self.ledger.record(type(msg).KIND, rnd, wire, msg, {"privacy": note} if note else None)
        return wire

    def _status(self, state: str, detail: str = "") -> bytes:
        # The example count is not announced: status is public (signed, not sealed), and under
        # secure aggregation the aggregator must learn weights only as a sum.
        st = M.DeviceStatus(device_id=self.cfg.device_id, state=state, profile=self.profile.name,  # type: ignore[arg-type]
                            num_examples=0, detail=detail, release=self.current_release_id() if state == "online" else None)
        return self._wrap(st, 0, sealed=False)

    def _unwrap(self, data: bytes, expect: type[M.Message], device_id: str, check_round: Any) -> M.Message:
        if self.cfg.insecure:
            msg = M.decode(data, expect=expect)
            check_round(getattr(msg, "round", 0))
            return msg
        assert self.agg_pub is not None
        return secure.open_message(data, expect, device_id=device_id, check_round=check_round, recipient=None,
                                   sender=self.agg_pub, sealed=False)

    def _future_round(self, r: int) -> None:
        if r <= self.last_round:
            raise ReplayError(f"announcement for round {r}; round {self.last_round} already seen")

    def _resumable(self) -> tuple[M.RoundSpec, bytes, int] | None:
        """The round a previous process of this device was training and this one can finish:
        (spec, announcement, step reached), or None (and the checkpoint, if any, removed)."""
        ck = train_checkpoint.load(self.work)
        if ck is None:
            return None
        me, h = self.cfg.device_id, ck.header
        spec: M.RoundSpec | None = None
        why, level = "", logging.INFO
        if h.round != self.last_round:
            why = f"the last round accepted is {self.last_round}"
        elif h.seq != self.seq:
            why = "an update for it may have been built already (the sequence counter moved)"
        elif time.time() > h.received_at + h.deadline_s:
            why = f"its deadline ({h.deadline_s:.0f}s) has passed"
        else:
            def this_round(r: int) -> None:
                if r != h.round:
                    raise ReplayError(f"stored announcement is for round {r}, the checkpoint for round {h.round}")

            try:
                msg = self._unwrap(h.announcement, M.RoundSpec, me, this_round)
                assert isinstance(msg, M.RoundSpec)
                spec = msg
            except ProtocolError as e:
                why, level = f"its stored announcement does not verify ({type(e).__name__}: {e})", logging.WARNING
            else:
                if train_checkpoint.spec_digest(spec) != h.spec_digest:
                    why, level = "its stored announcement is not the one it was trained for", logging.WARNING
                elif spec.secagg is not None or me not in spec.participants:
                    why = "it is not a plain round of this device"
        if why or spec is None:
            log.log(level, "%s: not resuming round %d from its training checkpoint: %s; it rejoins at the next round",
                    me, h.round, why)
            train_checkpoint.discard(self.work)
            return None
        return spec, h.announcement, ck.state.step

    def _not_past_round(self, r: int) -> None:
        if r < self.last_round:
            raise ReplayError(f"shutdown bound to round {r}, before the last round seen ({self.last_round})")

    def send(self, kind: str, payload: bytes) -> int:
        me = self.cfg.device_id
        return int(self.link_send(topics.up(me, kind), topics.up(me, "chunk"), payload))

    def link_send(self, topic: str, chunk_topic: str, payload: bytes) -> int:
        from fl_mqtt.transfer import send

        return send(self.link, topic, chunk_topic, payload, self.policy, self.outbox)

    def publish_status(self, state: str, detail: str = "", timeout: float = 60.0) -> None:
        self.link.publish(topics.up(self.cfg.device_id, "status"), self._status(state, detail), retain=True, timeout=timeout)

    # -- network -------------------------------------------------------------------------------
    def connect(self) -> None:
        from fl_mqtt.link import MqttLink

        c = self.cfg
        user, password, ca_file = c.mqtt_login()
        self.link = MqttLink(c.device_id, c.broker, username=user, password=password, ca_file=ca_file,
                             protocol=c.protocol, will=(topics.up(c.device_id, "status"), self._status("offline", "connection lost")),
                             allow_plaintext_password=c.allow_plaintext_password)
        self._connect_with_retries()
        self.link.birth = (topics.up(c.device_id, "status"), self._status("online", RECONNECTED))
        self.on_connected()

    def _connect_with_retries(self) -> None:
        """The first connect, retried with backoff for ``connect_retry_s``: a broker that is not up
        yet, a network that comes later, or a TLS check that fails on a clock that is being set
        ("certificate is not yet valid") must not end the device process. Each failure is one line."""
        from fl_mqtt.link import LinkError

        c = self.cfg
        deadline = time.monotonic() + c.connect_retry_s
        delay = 1.0
        while True:
            try:
                self.link.connect(c.connect_timeout_s)
                return
            except LinkError as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                wait = min(delay, left)
                log.warning("%s: %s; retrying in %.0fs (gives up after connect_retry_s = %.0fs)", c.device_id, e, wait,
                            c.connect_retry_s)
                time.sleep(wait)
                delay = min(delay * 2, 30.0)

    def on_connected(self) -> None:
        """A new process with its link up: subscribe, say what it is, finish half-done uploads."""
        me = self.cfg.device_id
        self.link.subscribe(topics.bcast_filter())
        self.link.subscribe(topics.down_filter(me))
        # A release being received when the last process died is resent whole: its staging goes.
        shutil.rmtree(self.work / RELEASE_STAGING, ignore_errors=True)
        # "started": this process holds no round's secrets, so a round it was in before a
        # restart goes on without it at once (the aggregator drops it) instead of waiting for it.
        # "resuming": it has that round's training checkpoint and finishes it (``resume_round``).
        self._resume = self._resumable()
        if self._resume is not None:
            spec, _, step = self._resume
            log.info("%s: resuming round %d from its training checkpoint at step %d", me, spec.round, step)
            self.publish_status("online", M.resuming(spec.round, step))
        else:
            self.publish_status("online", STARTED)
        self.resume_uploads()

    def resume_round(self) -> None:
        """Finish the round ``on_connected`` found a usable training checkpoint of, if any."""
        if self._resume is None:
            return
        spec, announcement, step = self._resume
        self._resume = None
        self.plain_round(spec, announcement, f"round {spec.round}, resumed at step {step}")

    def resume_uploads(self) -> None:
        """Finish uploads a previous run of this device left half done (chunks not yet PUBACKed)."""
        for m in self.outbox.unfinished():
            blob = self.work / "outbox" / f"{m.xfer_id}.payload"
            if not blob.exists():
                self.outbox.finish(m.xfer_id)
                continue
            log.info("%s: resuming upload %s (%d of %d chunks left)", self.cfg.device_id, m.xfer_id, len(self.outbox.pending(m.xfer_id)), m.count)
            self.send("update", blob.read_bytes())
            blob.unlink(missing_ok=True)

    def send_update(self, update: M.Update | M.SparseUpdate | M.MaskedUpdate) -> int:
        payload = self._wrap(update, update.round, sealed=True)
        # Keep the exact (sealed) bytes until every chunk is acknowledged, so a restart resumes
        # the same transfer instead of resealing, which would produce different bytes.
        from shared.chunking import needs_chunking, split

        if not needs_chunking(len(payload), self.policy):
            return self.send("update", payload)
        m = split(payload, self.policy)
        self.outbox.begin(m)
        (self.work / "outbox" / f"{m.xfer_id}.payload").write_bytes(payload)
        n = self.send("update", payload)
        (self.work / "outbox" / f"{m.xfer_id}.payload").unlink(missing_ok=True)
        return n

    def handle(self, topic: str, payload: bytes) -> bool:
        """Process one incoming message; returns False when the device should stop."""
        me = self.cfg.device_id
        try:
            t = topics.parse(topic)
            if t.kind == "chunk":
                frame = decode_frame(payload)
                done = None
                if isinstance(frame, Manifest):
                    self.downloads.start(frame, sender=topic)
                elif isinstance(frame, Chunk):
                    done = self.downloads.add(frame, sender=topic)
                if done is None:
                    return True
                kind = self._kind_of(done)
                payload = done
            else:
                kind = t.kind
            if kind == "shutdown":
                msg = self._unwrap(payload, M.Shutdown, secure.BROADCAST, self._not_past_round)
                log.info("%s: aggregator shut down (%s)", me, msg.reason)  # type: ignore[attr-defined]
                self._stop_reason = f"aggregator shut down ({msg.reason})"  # type: ignore[attr-defined]
                return False
            if kind == "secagg":
                msg = self._unwrap(payload, M.SecAggMsg, me, self._secagg_round)
                assert isinstance(msg, M.SecAggMsg)
                self.on_secagg(msg)
                return True
            if kind == "release":
                msg = self._unwrap(payload, M.Release, me, self._not_past_round)
                assert isinstance(msg, M.Release)
                self.on_release(msg)
                return True
            if kind != "round":
                return True
            spec = self._unwrap(payload, M.RoundSpec, me, self._future_round)
        except (secagg.SecAggAbort, ConfigError) as e:
            log.warning("%s: secure aggregation of round %s aborted: %s", me, self.last_round, e)
            self.sa_spec = self.sa_state = None
            self.publish_status("declined", f"secure aggregation aborted: {e}"[:500])  # nobody waits for us
            return True
        except (hardened.PeerVerificationError, BelowFloor) as e:
            # A peer's advert that does not verify, or survivors nobody agrees on: the aggregator
            # (or someone on its path) is not following the protocol. Keep the secrets, leave.
            log.error("%s: refusing secure aggregation of round %s: %s", me, self.last_round, e)
            self.sa_spec = self.sa_state = None
            self.publish_status("declined", f"refused: {e}")
            return True
        except ProtocolError as e:
            log.warning("%s: rejected message on %s: %s: %s", me, topic, type(e).__name__, e)
            return True
        assert isinstance(spec, M.RoundSpec)
        if me not in spec.participants:
            return True
        self._seen_round(spec.round)
        why = self.below_floor(spec) or self.privacy.refusal(spec)
        if why:
            log.error("%s: refusing round %d: %s", me, spec.round, why)
            self.publish_status("declined", f"refused: {why}")
            return True
        if spec.secagg is not None:
            try:
                self.start_secagg(spec)
            except BelowFloor as e:
                log.error("%s: refusing round %d: %s", me, spec.round, e)
                self.sa_spec = self.sa_state = None
                self.publish_status("declined", f"refused: {e}")
            except (ProtocolError, ConfigError) as e:
                log.warning("%s: cannot join secure aggregation of round %d: %s", me, spec.round, e)
                self.sa_spec = self.sa_state = None
                self.publish_status("declined", str(e))
            return True
        self.plain_round(spec, payload)
        return True

    def below_floor(self, spec: M.RoundSpec) -> str:
        """Why this device refuses the round whatever else it says, or "" (secure rounds are also
        checked against the floors when the device advertises: ``hardened.client_advertise``)."""
        if self.cfg.insecure or self.authority is None or self.cfg.allow_plain_rounds:
            return ""  # no authority key: this device cannot take secure rounds at all
        if spec.secagg is None:
            return (f"round {spec.round} without secure aggregation: the aggregator would see this device's update "
                    "(this device requires secure aggregation; allow_plain_rounds = false)")
        if spec.sparse.method == "device_topk":
            return "per-device top-k (device_topk) reveals which coordinates this device sends"
        return ""

    def plain_round(self, spec: M.RoundSpec, announcement: bytes, detail: str = "") -> None:
        """Train a round without secure aggregation and send its update (or decline it)."""
        me = self.cfg.device_id
        self.publish_status("training", detail or f"round {spec.round}")
        try:
            update = self.train_round(spec, announcement)
        except Declined as e:
            log.warning("%s: declining round %d: %s", me, spec.round, e)
            self.publish_status("declined", str(e))
            return
        n = self.send_update(update)
        log.info("%s: round %d update sent (%d bytes on the wire)", me, spec.round, n)
        self.publish_status("online")

    # -- releases ------------------------------------------------------------------------------
    def release_store(self) -> Any:
        from edge_client.releases import ReleaseStore

        if self.agg_pub is None:
            raise ConfigError("releases are verified under the aggregator's key; insecure mode cannot install them")
        return ReleaseStore(self.cfg.releases_dir or self.work / "releases", self.agg_pub, self.cfg.fleet)

    def current_release_id(self) -> str | None:
        """The installed release's id ("" for none), said in every "online" status so that the
        aggregator resends the latest to a device that lacks it; None where releases are off."""
        if self._release_id is None and not self.cfg.insecure and self.agg_pub is not None:
            try:
                cur = self.release_store().current()  # signature and every digest checked again
                self._release_id = cur[0].release_id if cur is not None else ""
            except (ProtocolError, ConfigError, OSError) as e:
                # A damaged current release is reported as none: the aggregator sends the latest again.
                log.warning("%s: the current release is unusable (%s); reporting none", self.cfg.device_id, e)
                self._release_id = ""
        return self._release_id

    def on_release(self, msg: M.Release) -> None:
        """Stage the files, verify and install (edge_client.releases), and say how it went."""
        from shared import release

        staging = self.work / RELEASE_STAGING
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        rid = "?"
        try:
            rid = release.ReleaseManifest.decode(crypto_payload(msg.manifest)).release_id
            for f in msg.files:
                if not release.FILE_RE.match(f.name):
                    raise ProtocolError(f"release file name {f.name!r} is not a plain name")
                (staging / f.name).write_bytes(f.data)
            m = self.release_store().install(staging, msg.manifest)
            self._release_id = m.release_id
            self.link.birth = (topics.up(self.cfg.device_id, "status"), self._status("online", RECONNECTED))
            self.publish_status("release", f"installed {m.release_id}")
        except (ProtocolError, ConfigError, OSError) as e:
            log.error("%s: release %s refused: %s; keeping the current one", self.cfg.device_id, rid, e)
            self.publish_status("release", f"refused {rid}: {e}"[:500])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.publish_status("online")  # the retained status says online again (the release answer was not)

    # -- secure aggregation --------------------------------------------------------------------
    def _kind_of(self, payload: bytes) -> str:
        if self.cfg.insecure:
            return type(M.decode(payload)).KIND
        return secure.peek(payload)[0].kind

    def _secagg_round(self, r: int) -> None:
        if self.sa_spec is None or r != self.sa_spec.round:
            raise ReplayError(f"secure-aggregation message for round {r}; the open round is "
                              f"{self.sa_spec.round if self.sa_spec else 'none'}")

    def _send_secagg(self, rnd: int, body: bytes) -> int:
        msg = M.SecAggMsg(round=rnd, device_id=self.cfg.device_id, body=body)
        return self.send("secagg", self._wrap(msg, rnd, sealed=True))

    def start_secagg(self, spec: M.RoundSpec) -> None:
        """Stage 0: fresh keys for this round, advertised to the aggregator."""
        sa = spec.secagg
        assert sa is not None
        if len(sa.node_ids) != len(spec.participants):
            raise SchemaError("secagg node_ids and participants differ in length")
        if spec.sparse.method == "device_topk":
            raise SchemaError("device_topk sparsity cannot be securely aggregated")
        node = sa.node_ids[spec.participants.index(self.cfg.device_id)]
        params = secagg.SecAggParams(round_id=spec.round, node_ids=sa.node_ids, threshold=sa.threshold,
                                     dim=update_codec.masked_dim(spec.sparse, sa, spec.scoring), graph_seed=sa.graph_seed)
        if self.cfg.insecure:
            inner, adv = secagg.client_advertise(params, node)  # semi-honest: nothing to sign with
            self.sa_state = hardened.HardenedClient(inner, None)  # type: ignore[arg-type]
            self.sa_ident = None
        else:
            if self.authority is None or not self.cert:
                raise ConfigError("no fleet-authority key or certificate (authority_keys, cert): this device cannot "
                                  "check its peers, so it does not take part in secure aggregation")
            self.sa_ident = hardened.Identity(device_of=dict(zip(sa.node_ids, spec.participants)), authority=self.authority,
                                              keys=self.keys, cert=self.cert, floors=self.floors)
            self.sa_state, adv = hardened.client_advertise(params, node, self.sa_ident)  # type: ignore[assignment]
        self.sa_spec, self.sa_built = spec, None
        self._send_secagg(spec.round, secagg.encode(adv))
        log.info("%s: round %d secure aggregation as node %d (t=%d, %d coordinates)", self.cfg.device_id, spec.round,
                 node, sa.threshold, spec.sparse.k)

    def on_secagg(self, msg: M.SecAggMsg) -> None:
        spec, state = self.sa_spec, self.sa_state
        assert spec is not None and state is not None
        inner = secagg.decode(msg.body)
        ident = self.sa_ident
        # A device that can check its peers takes only the hardened messages: no downgrade.
        if ident is not None and isinstance(inner, (secagg.NeighbourKeys, secagg.UnmaskRequest)):
            raise SchemaError(f"{type(inner).__name__} in a round that must be hardened; refusing")
        if isinstance(inner, secagg.NeighbourKeys):
            st, out = secagg.client_share_keys(state.inner, inner)
            self.sa_state = replace(state, inner=st)
            self._send_secagg(spec.round, secagg.encode(out))
        elif isinstance(inner, hardened.AdvertList):
            if ident is None:
                raise SchemaError("an advert list in a semi-honest round")
            self.sa_state, reveal = hardened.client_reveal(state, inner, ident)
            self._send_secagg(spec.round, secagg.encode(reveal))
        elif isinstance(inner, hardened.SignedKeys):
            if ident is None:
                raise SchemaError("signed keys in a semi-honest round")
            self.sa_state, out = hardened.client_share_keys(state, inner, ident)
            self._send_secagg(spec.round, secagg.encode(out))
        elif isinstance(inner, secagg.ForwardedShares):
            if ident is not None:
                # Open the neighbours' bundles before training and say which failed: the
                # aggregator cuts those pairs, and a garbage bundle cannot void our round.
                self.sa_state, receipt = hardened.client_open_shares(state, inner)
                self._send_secagg(spec.round, secagg.encode(receipt))
            self.masked_round(spec, self.sa_state, inner)
        elif isinstance(inner, secagg.MaskPeers):
            if ident is None:
                raise SchemaError("mask peers in a semi-honest round")
            self.send_masked(spec, state, inner)
        elif isinstance(inner, hardened.ConsistencyRequest):
            if ident is None:
                raise SchemaError("consistency request in a semi-honest round")
            self.sa_state, sig = hardened.client_consistency(state, inner, ident)
            self._send_secagg(spec.round, secagg.encode(sig))
        elif isinstance(inner, (secagg.UnmaskRequest, hardened.SignedUnmaskRequest)):
            if isinstance(inner, hardened.SignedUnmaskRequest):
                if ident is None:
                    raise SchemaError("signed unmask request in a semi-honest round")
                self.sa_state, ans = hardened.client_unmask(state, inner, ident)
            else:
                st, ans = secagg.client_unmask(state.inner, inner)
            self._send_secagg(spec.round, secagg.encode(ans))
            self.sa_spec = self.sa_state = None  # this round's secrets are gone
            log.info("%s: round %d unmask shares sent", self.cfg.device_id, spec.round)
        else:
            raise SchemaError(f"unexpected secure-aggregation message {type(inner).__name__} from the aggregator")

    def score_rollouts(self, sc: M.ScoringSpec) -> np.ndarray:
        """fl-minillm client-teacher round: this device's locally trained student scores the
        aggregator's rollouts; the vector leaves the device only masked, inside the update."""
        from fl_lm.fleet_teacher import score_rollouts

        t = tensors.unpack(sc.tensors)
        t0 = time.monotonic()
        vec = score_rollouts(self._peft, np.array(t["ids"]), np.array(t["candidates"]), t["mask"].astype(bool), sc.prompt_len)
        log.info("%s: scored %d rollouts x %d positions on %d candidates (%.1fs)", self.cfg.device_id, sc.rollouts,
                 sc.positions, sc.k, time.monotonic() - t0)
        return vec

    def masked_round(self, spec: M.RoundSpec, state: hardened.HardenedClient, shares: secagg.ForwardedShares) -> None:
        """Stage 2: train and build the clipped, sparse, quantized input; mask and send it now
        (semi-honest) or once the aggregator names the peers to mask with (hardened)."""
        sa = spec.secagg
        assert sa is not None
        me = self.cfg.device_id
        self.publish_status("training", f"round {spec.round}")
        try:
            delta, res = self.train_delta(spec)
        except Declined as e:
            log.warning("%s: declining round %d: %s", me, spec.round, e)
            self.publish_status("declined", str(e))
            self.sa_spec = self.sa_state = None
            return
        self.last_train = res
        scores = None
        if spec.scoring is not None:
            try:
                scores = self.score_rollouts(spec.scoring)
            except (ValueError, SchemaError) as e:
                log.warning("%s: declining round %d: cannot score its rollouts: %s", me, spec.round, e)
                self.publish_status("declined", f"cannot score the rollouts: {e}")
                self.sa_spec = self.sa_state = None
                return
        try:
            built = update_builder.secure(self._flat(spec, delta), self.residual, spec.sparse, sa, len(self.examples),
                                          train_loss=res.mean_loss, scores=scores)
        except (ValueError, SchemaError, ConfigError) as e:
            # Whatever goes wrong after the device joined the round, it says so: the round moves
            # on at once instead of waiting out its update deadline for this device.
            log.warning("%s: declining round %d: %s", me, spec.round, e)
            if isinstance(e, update_builder.NonFiniteInput) and self.residual is not None and not np.isfinite(self.residual).all():
                self.residual = None  # a poisoned residual is dropped, not carried into the next round
                (self.work / "residual.npy").unlink(missing_ok=True)
            self.publish_status("declined", f"{e}"[:500])
            self.sa_spec = self.sa_state = None
            return
        assert built.x is not None
        if scores is not None and self.cfg.keep_sent:
            d = self.work / "sent"
            d.mkdir(parents=True, exist_ok=True)
            np.save(d / f"round_{spec.round:04d}_scores.npy", scores, allow_pickle=False)
        self.sa_built = (built, res)
        if self.sa_ident is None:
            self.send_masked(spec, state, shares)

    def send_masked(self, spec: M.RoundSpec, state: hardened.HardenedClient,
                    msg: secagg.ForwardedShares | secagg.MaskPeers) -> None:
        sa = spec.secagg
        assert sa is not None
        me = self.cfg.device_id
        if self.sa_built is None:
            raise ProtocolError(f"{type(msg).__name__} before this device built its round-{spec.round} input")
        built, res = self.sa_built
        self.sa_built = None
        if isinstance(msg, secagg.MaskPeers):
            self.sa_state, masked = hardened.client_mask(state, msg, built.x)
        else:
            inner, masked = secagg.client_masked_input(state.inner, msg, built.x)
            self.sa_state = replace(state, inner=inner)
        self._save_residual(built.residual)
        self._keep(spec.round, built.sent)
        seq = self._next_seq()
        eps = self.privacy.charge(spec)  # before the bytes leave: a crash wastes budget, never reuses it
        if eps is not None:
            log.info("%s: round %d: this device's epsilon is now %.4g at delta %g", me, spec.round, eps, self.privacy.floors.delta)
        # What the auditor reads beside the update in the ledger: the clip, the noise, the epsilon after.
        self._ledger_note[spec.round] = ({"clip": sa.clip, "dp": None} if sa.dp is None else
                                         {"l2_clip": sa.dp.l2_clip, "noise_multiplier": sa.dp.noise_multiplier,
                                          "quorum": sa.dp.quorum, "epsilon_after": eps, "delta": self.privacy.floors.delta})
        # Weight and loss travel masked in the vector's tail; the clear fields carry nothing.
        up = M.MaskedUpdate(round=spec.round, device_id=me, seq=seq, num_examples=1,
                            steps=res.steps, train_loss=0.0, base_digest=self.digest,
                            masked=sparse.pack_ring(np.frombuffer(masked.masked, dtype="<u4"), sa.ring_bits))
        n = self.send_update(up)
        log.info("%s: round %d masked update sent (%d coordinates, %.1f%% clipped at %g, residual norm %.3g, %d bytes on the wire)",
                 me, spec.round, spec.sparse.k, 100 * built.clipped, sa.clip, float(np.linalg.norm(built.residual)), n)
        self.publish_status("online")

    def run(self) -> None:
        # Everything that can be refused is checked before connecting (load_model), in one line.
        self.load_model()
        self.connect()
        idle_since = time.monotonic()
        try:
            self.resume_round()
            idle_since = time.monotonic()
            while True:
                inc = self.link.get(timeout=1.0)
                self.downloads.expire()
                if inc is None:
                    if self.cfg.idle_timeout_s and time.monotonic() - idle_since > self.cfg.idle_timeout_s:
                        log.warning("%s: no message for %.0fs, exiting", self.cfg.device_id, self.cfg.idle_timeout_s)
                        self._stop_reason = f"no message for {self.cfg.idle_timeout_s:g}s (idle_timeout_s)"
                        break
                    continue
                idle_since = time.monotonic()
                if not self.handle(inc.topic, inc.payload):
                    break
        except BaseException as e:
            # Whatever stops the process (a bug, a GPU fault, Ctrl-C) is the offline status's
            # detail, in one line, so the aggregator's round record says why this device left.
            self._stop_reason = stop_reason(e)
            raise
        finally:
            try:
                self.publish_status("offline", self._stop_reason, timeout=5)
            except Exception as e:  # best effort on the way out; the will covers a dead link
                log.debug("could not publish offline status: %s", e)
            self.link.close()


def stop_reason(e: BaseException) -> str:
    """One line saying why a device process stopped, for its signed "offline" status."""
    if isinstance(e, KeyboardInterrupt):
        return "stopped: interrupted"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"stopped: {type(e).__name__}{': ' + first if first else ''}"[:500]
