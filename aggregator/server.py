"""The aggregator's round loop: announce, collect until quorum or deadline, aggregate, evaluate.

Network messages arrive on a queue (``fl_mqtt``) and are handled here, on one thread, in order.
Anything that fails to decode or validate is logged with its typed error and the round goes on.

With secure aggregation (the default) a round has four stages, each collected until every
expected device answered or the stage's deadline: advertise keys, share keys, masked updates,
unmask shares (``shared.secagg``). Masked vectors are folded into one running sum as they arrive
and never stored; only the unmasked sum of the survivors exists, and only if at least t survive.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aggregator import checkpoint, registry
from aggregator.config import AggregatorConfig
from aggregator.strategy import FedAvg, Reply, weighted_mean
from shared import messages as M
from shared import secagg, secure, sparse, tensors, topics, update_codec
from shared.chunking import Chunk, ChunkPolicy, Manifest, Reassembler, decode_frame
from shared.crypto import PublicKeys, load_private_keys
from shared.datasets import Example, load_file
from shared.errors import ConfigError, ProtocolError, ReplayError, SchemaError

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
    bytes_by_kind: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> up/down kind -> bytes
    rejected: int = 0
    spec: M.RoundSpec | None = None
    idx: np.ndarray | None = None  # the round's shared index set
    # Secure aggregation: the stage being collected, who must answer it, and what arrived.
    stage: str = "update"  # advertise, share, update, unmask
    expect: set[str] | None = None  # None: every participant
    inbox: dict[str, Any] = field(default_factory=dict)
    sa: Any = None  # shared.secagg.ServerState
    node_of: dict[str, int] = field(default_factory=dict)
    received: list[str] | None = None  # secure aggregation: the devices whose inputs are in the sum

    def waiting_for(self) -> set[str]:
        expect = set(self.participants) if self.expect is None else self.expect
        got = set(self.replies) if self.stage == "update" else set(self.inbox)
        return expect - got - self.dropped

    def count(self, device: str, direction: str, kind: str, n: int) -> None:
        total = self.bytes_up if direction == "up" else self.bytes_down
        total[device] = total.get(device, 0) + n
        per = self.bytes_by_kind.setdefault(device, {})
        key = f"{direction}_{kind}"
        per[key] = per.get(key, 0) + n


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
        self.keys = None
        self.pubkeys: dict[str, PublicKeys] = {}
        if cfg.insecure:
            log.warning("SECURITY OFF (insecure = true): updates are accepted unencrypted and unsigned, and "
                        "announcements go unsigned. Debug use only.")
            self.enrolled = set(cfg.devices)
        else:
            assert cfg.keys is not None and cfg.registry is not None
            self.keys = load_private_keys(cfg.keys)
            self.pubkeys = registry.load(cfg.registry)
            if cfg.devices:
                missing = sorted(set(cfg.devices) - set(self.pubkeys))
                if missing:
                    raise ConfigError(f"devices {missing} are not enrolled in {cfg.registry}")
            self.enrolled = set(cfg.devices or self.pubkeys)
            if not self.enrolled:
                raise ConfigError(f"no devices enrolled in {cfg.registry}: run `fl-agg enroll DEVICE_ID PUBKEY_FILE`")
        self.policy = ChunkPolicy(max_message_bytes=cfg.chunk_bytes)
        # Bounded: at most two transfers per enrolled device in flight, idle ones dropped after 10 min.
        self.uploads = Reassembler(max_transfers=2 * len(self.enrolled) + 2, max_transfer_bytes=1 << 30,
                                   max_total_bytes=4 << 30, idle_timeout_s=600)
        self.last_seq: dict[str, int] = {}
        self.online: dict[str, int] = {}  # device -> num_examples it reported
        self.eval_examples = load_eval(cfg.eval_data, cfg.eval_max_per_family)
        self.lora = M.LoraSpec(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules)
        self.book: RoundBook | None = None
        self.link: Any = None
        self.global_state: dict[str, np.ndarray] = {}
        self.round = 0
        self._ignored: set[str] = set()
        self.scores: np.ndarray | None = None  # momentum of aggregate magnitudes, for global top-k
        self.sketch: np.ndarray | None = None  # last round's summed magnitude sketch (secure aggregation)
        if cfg.secagg:
            log.info("secure aggregation on: the aggregator learns only the sum of each round's updates")
        else:
            log.warning("secure aggregation OFF (secagg = false): the aggregator sees each device's update")

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
            for attr, name in (("scores", "sparse_scores.npy"), ("sketch", "sparse_sketch.npy")):
                if (self.out / name).exists():  # the aggregator's own files: what picks the next index set
                    setattr(self, attr, np.load(self.out / name, allow_pickle=False))
            log.info("resumed from %s (round %d)", st.checkpoint, st.round)
        else:
            self.global_state = get_adapter(self.peft)
            checkpoint.save(self.out, 0, self.peft)
        self.layout = sparse.Layout.from_tensors(self.global_state)
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
            for sender, xfer in self.uploads.expire():
                log.warning("dropped incomplete upload %s from %s (idle too long)", xfer, sender)

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
                # Chunks are update bytes: devices chunk only updates.
                self.book.count(t.device_id, "up", "update" if t.kind == "chunk" else t.kind, wire_bytes)
            if t.kind == "chunk":
                frame = decode_frame(payload)
                if isinstance(frame, Manifest):
                    self.uploads.start(frame, sender=t.device_id)
                    return
                assert isinstance(frame, Chunk)
                done = self.uploads.add(frame, sender=t.device_id)
                if done is None:
                    return
                payload, kind = done, "update"
            else:
                kind = t.kind
            if kind == "status":
                self.on_status(t.device_id, self.unwrap(payload, M.DeviceStatus, t.device_id, self._status_round))  # type: ignore[arg-type]
            elif kind == "update":
                self.on_update(t.device_id, self.unwrap(payload, self._update_kind(payload), t.device_id, self._current_round))  # type: ignore[arg-type]
            elif kind == "secagg":
                self.on_secagg(t.device_id, self.unwrap(payload, M.SecAggMsg, t.device_id, self._current_round))  # type: ignore[arg-type]
            else:
                raise SchemaError(f"unknown upload kind {t.kind!r}")
        except ProtocolError as e:
            if self.book is not None:
                self.book.rejected += 1
            log.warning("rejected message on %s: %s: %s", topic, type(e).__name__, e)

    def _update_kind(self, data: bytes) -> type[M.Message]:
        """Which update message an upload claims to hold (checked again when it is opened)."""
        kind = type(M.decode(data)).KIND if self.cfg.insecure else secure.peek(data)[0].kind
        cls = M.KINDS.get(kind)
        if cls not in M.UPDATE_KINDS:
            raise SchemaError(f"{kind!r} is not an update message")
        return cls  # type: ignore[return-value]

    def unwrap(self, data: bytes, expect: type[M.Message], device: str, check_round: Any) -> M.Message:
        """Authenticate and decode an upload, or raise a typed ProtocolError."""
        if self.cfg.insecure:
            msg = M.decode(data, expect=expect)
            check_round(getattr(msg, "round", 0))
            return msg
        sealed = expect is not M.DeviceStatus  # status is public (signed); everything else is sealed to us
        return secure.open_message(data, expect, device_id=device, check_round=check_round,
                                   recipient=self.keys if sealed else None,
                                   sender=self.pubkeys[device], sealed=sealed)

    @staticmethod
    def _status_round(r: int) -> None:
        if r != 0:
            raise ReplayError(f"status bound to round {r}, expected 0")

    def _current_round(self, r: int) -> None:
        current = self.book.rnd if self.book is not None else None
        if r != current:
            raise ReplayError(f"update for round {r}; the open round is {current}")

    def wrap(self, msg: M.Message, rnd: int, device: str) -> bytes:
        """Sign what we send (announcements are public but must not be forgeable)."""
        if self.cfg.insecure:
            return M.encode(msg)
        assert self.keys is not None
        return secure.sign_message(msg, round=rnd, device_id=device, key=self.keys)

    def on_status(self, device: str, st: M.DeviceStatus) -> None:
        if st.device_id != device:
            raise ReplayError(f"status for {st.device_id} arrived on {device}'s topic")
        if st.state == "offline":
            self.online.pop(device, None)
            if self.book is not None and device in self.book.participants:
                # Also when it is not awaited right now: a later secure-aggregation stage would be.
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

    def on_update(self, device: str, up: M.Update | M.SparseUpdate | M.MaskedUpdate) -> None:
        b = self.book
        if up.device_id != device:
            raise ReplayError(f"update for {up.device_id} arrived on {device}'s topic")
        if b is None or up.round != b.rnd or b.spec is None:
            raise ReplayError(f"update from {device} for round {up.round}; current round is {b.rnd if b else 'none'}")
        if device not in b.participants:
            raise ReplayError(f"{device} is not a participant of round {b.rnd}")
        if up.seq <= self.last_seq.get(device, 0):
            raise ReplayError(f"repeated (device, round, seq) = ({device}, {up.round}, {up.seq})")
        if device in b.replies:
            raise ReplayError(f"second update from {device} in round {b.rnd}")
        if up.base_digest != self.digest:
            raise SchemaError(f"update from {device} is for base {up.base_digest[:12]}")
        if up.num_examples < 1:
            raise SchemaError(f"update from {device} claims {up.num_examples} examples")
        spec = b.spec
        want = M.MaskedUpdate if spec.secagg is not None else (M.Update if spec.sparse.method == "dense" else M.SparseUpdate)
        if not isinstance(up, want):
            raise SchemaError(f"round {b.rnd} takes {want.KIND!r} updates, {device} sent {type(up).KIND!r}")
        if isinstance(up, M.MaskedUpdate):
            reply = self._fold_masked(device, up)
        elif isinstance(up, M.SparseUpdate):
            reply = Reply(device, up.num_examples, self._sparse_delta(device, up))
        else:
            reply = Reply(device, up.num_examples, self._dense_delta(device, up))
        self.last_seq[device] = up.seq
        b.replies[device] = reply
        b.train_loss[device] = up.train_loss
        if self.cfg.keep_received:
            d = self.out / "received" / f"round_{b.rnd:04d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{device}.msgpack").write_bytes(M.encode(up))
        log.info("round %d: %s from %s (%d examples, %d/%d)", b.rnd, type(up).KIND, device, up.num_examples,
                 len(b.replies), len(b.participants))

    def _dense_delta(self, device: str, up: M.Update) -> dict[str, np.ndarray]:
        delta = tensors.unpack(up.tensors)
        if set(delta) != set(self.global_state):
            raise SchemaError(f"update from {device} has {len(delta)} tensors, expected the {len(self.global_state)} of the adapter")
        for k, v in delta.items():
            if v.shape != self.global_state[k].shape or v.dtype != np.float32:
                raise SchemaError(f"update from {device}: tensor {k} is {v.dtype}{v.shape}, expected float32{self.global_state[k].shape}")
            if not np.isfinite(v).all():
                raise SchemaError(f"update from {device}: tensor {k} has non-finite values")
        return delta

    def _sparse_delta(self, device: str, up: M.SparseUpdate) -> dict[str, np.ndarray]:
        b = self.book
        assert b is not None and b.spec is not None
        sp = b.spec.sparse
        if up.encoding == "topk":
            if sp.method != "device_topk":
                raise SchemaError(f"{device} sent its own top-k in a round with a shared index set")
            idx, vals = sparse.topk_decode(up.values, sp.dim)
            if len(idx) > sp.k:
                raise SchemaError(f"{device} sent {len(idx)} coordinates, the round allows {sp.k}")
            if not np.isfinite(vals).all():
                raise SchemaError(f"update from {device} has non-finite values")
        else:
            if b.idx is None:
                raise SchemaError(f"{device} sent shared-index values in a device_topk round")
            idx, vals = b.idx, update_codec.decode_values(up.values, sp.value_dtype, len(b.idx))
        return sparse.unflatten(sparse.scatter(vals, idx, sp.dim), self.layout)

    def _fold_masked(self, device: str, up: M.MaskedUpdate) -> Reply:
        """Add a masked vector to the running sum and forget it: no individual vector is kept."""
        b = self.book
        assert b is not None and b.spec is not None and b.spec.secagg is not None
        if b.stage != "update" or b.sa is None:
            raise ReplayError(f"masked update from {device} outside the masked-input stage ({b.stage})")
        sa, k = b.spec.secagg, update_codec.secagg_dim(b.spec.sparse, b.spec.secagg)
        if len(up.masked) != sparse.ring_bytes(k, sa.ring_bits):
            raise SchemaError(f"masked update from {device} has {len(up.masked)} bytes, expected "
                              f"{sparse.ring_bytes(k, sa.ring_bits)}")
        node = b.node_of[device]
        if node not in b.sa.u2:
            raise ReplayError(f"{device} did not finish the key exchange of round {b.rnd}")
        y = sparse.unpack_ring(up.masked, sa.ring_bits, k)
        b.sa = secagg.server_add_masked(b.sa, secagg.MaskedInput(b.rnd, node, y.astype("<u4", copy=False).tobytes()))
        return Reply(device, up.num_examples, {})

    def on_secagg(self, device: str, msg: M.SecAggMsg) -> None:
        b = self.book
        if b is None or b.spec is None or b.spec.secagg is None or msg.round != b.rnd:
            raise ReplayError(f"secure-aggregation message from {device} for round {msg.round}, no such round open")
        if msg.device_id != device:
            raise ReplayError(f"secure-aggregation message for {msg.device_id} arrived on {device}'s topic")
        inner = secagg.decode(msg.body)
        want = {"advertise": secagg.AdvertiseKeys, "share": secagg.ShareKeys, "unmask": secagg.UnmaskShares}.get(b.stage)
        if want is None or not isinstance(inner, want):
            raise ReplayError(f"{type(inner).__name__} from {device} during stage {b.stage!r}")
        if device not in b.waiting_for():
            raise ReplayError(f"{device} is not expected in stage {b.stage!r} (already answered or not in it)")
        if inner.round_id != b.rnd or inner.sender != b.node_of[device]:
            raise ReplayError(f"{device} sent a stage message as node {inner.sender} of round {inner.round_id}")
        b.inbox[device] = inner

    # -- rounds --------------------------------------------------------------------------------
    def drain(self) -> None:
        """Handle whatever has already arrived, without waiting."""
        while (inc := self.link.get(timeout=0)) is not None:
            self.dispatch(inc.topic, inc.payload, inc.wire_bytes)

    def wait_for_devices(self) -> None:
        deadline = time.monotonic() + self.cfg.wait_for_devices_s
        while len(self.online) < self.cfg.min_devices_to_start and time.monotonic() < deadline:
            inc = self.link.get(timeout=0.5)
            if inc is not None:
                self.dispatch(inc.topic, inc.payload, inc.wire_bytes)
            self.uploads.expire()
        if len(self.online) < self.cfg.min_devices_to_start:
            log.warning("only %d of %d devices online after %.0fs; starting anyway", len(self.online), self.cfg.min_devices_to_start, self.cfg.wait_for_devices_s)

    def make_spec(self, rnd: int, participants: list[str]) -> M.RoundSpec:
        """The round's announcement: global adapter, index set and secure-aggregation settings."""
        c = self.cfg
        seed = c.seed * 100_003 + rnd
        dim = self.layout.dim
        k = max(1, min(dim, round(c.density * dim)))
        if k == dim:
            sp = M.SparseSpec(method="dense", dim=dim, k=dim, seed=seed, indices=b"", value_dtype=c.sparse_value_dtype)  # type: ignore[arg-type]
        elif c.sparse_method == "device_topk":
            sp = M.SparseSpec(method="device_topk", dim=dim, k=k, seed=seed, indices=b"", value_dtype=c.sparse_value_dtype)  # type: ignore[arg-type]
        elif c.sparse_method == "topk" and c.secagg and c.sketch_block and self.sketch is not None:
            # The fleet told us (in aggregate) where its unsent mass is: ask for exactly that.
            idx = sparse.select_indices(self.sketch, k, seed, explore=0.0)
            sp = M.SparseSpec(method="topk", dim=dim, k=k, seed=seed, indices=sparse.encode_indices(idx, dim),
                              value_dtype=c.sparse_value_dtype)  # type: ignore[arg-type]
        elif c.sparse_method == "random" or self.scores is None:
            # Global top-k needs a previous aggregate; the first round draws its coordinates at random.
            idx = sparse.random_k(dim, k, seed)
            sp = M.SparseSpec(method="random", dim=dim, k=k, seed=seed, indices=sparse.encode_indices(idx, dim),
                              value_dtype=c.sparse_value_dtype)  # type: ignore[arg-type]
        else:
            idx = sparse.select_indices(self.scores, k, seed, c.topk_explore)
            sp = M.SparseSpec(method="topk", dim=dim, k=k, seed=seed, indices=sparse.encode_indices(idx, dim),
                              value_dtype=c.sparse_value_dtype)  # type: ignore[arg-type]
        sa = None
        if c.secagg:
            n = len(participants)
            kk = secagg.graph.neighbourhood_size(n)
            t = min(c.secagg_threshold or secagg.default_threshold(n), kk)
            try:
                ring_bits, value_bits = update_codec.ring_for(n, c.value_bits)
            except ConfigError as e:
                raise secagg.SecAggAbort(str(e)) from e
            sa = M.SecAggSpec(node_ids=tuple(range(n)), threshold=t, graph_seed=os.urandom(32), clip=c.clip,
                              ring_bits=ring_bits, value_bits=value_bits,
                              weight_norm=max(1, max(self.online.get(d, 1) for d in participants)),
                              sketch_block=c.sketch_block if sp.method != "dense" else 0)
        return M.RoundSpec(round=rnd, participants=tuple(participants), local_steps=c.local_steps,
                           learning_rate=c.learning_rate, lora=self.lora, base_digest=self.digest,
                           deadline_s=c.round_timeout_s, seed=seed, adapter=tensors.pack(self.global_state),
                           sparse=sp, secagg=sa)

    def send_to(self, device: str, kind: str, msg: M.Message) -> int:
        from fl_mqtt.transfer import send

        b = self.book
        assert b is not None
        n = send(self.link, topics.down(device, kind), topics.down(device, "chunk"), self.wrap(msg, b.rnd, device), self.policy)
        b.count(device, "down", kind, n)
        return n

    def _collect(self, stage: str, expect: set[str], timeout_s: float) -> dict[str, Any]:
        b = self.book
        assert b is not None
        b.stage, b.expect, b.inbox = stage, set(expect), {}
        self.pump(min(time.monotonic() + timeout_s, b.deadline))
        missing = b.waiting_for()
        if missing:
            log.warning("round %d: no %s message from %s; treating them as dropouts", b.rnd, stage, sorted(missing))
        return b.inbox if stage != "update" else b.replies

    def _relay(self, out: dict[int, Any]) -> None:
        b = self.book
        assert b is not None and b.spec is not None
        dev_of = {n: d for d, n in b.node_of.items()}
        for node, msg in out.items():
            self.send_to(dev_of[node], "secagg", M.SecAggMsg(round=b.rnd, device_id=dev_of[node], body=secagg.encode(msg)))

    def secure_round(self) -> dict[str, np.ndarray] | None:
        """Stages 0-3 of SecAgg+; returns the weighted mean delta, or None below quorum/threshold."""
        b = self.book
        assert b is not None and b.spec is not None and b.spec.secagg is not None
        spec, sa = b.spec, b.spec.secagg
        b.node_of = dict(zip(spec.participants, sa.node_ids))
        dev_of = {n: d for d, n in b.node_of.items()}
        to = self.cfg.key_timeout_s
        params = secagg.SecAggParams(round_id=b.rnd, node_ids=sa.node_ids, threshold=sa.threshold,
                                     dim=update_codec.secagg_dim(spec.sparse, sa),
                                     graph_seed=sa.graph_seed)
        b.sa = secagg.server_init(params)
        got = self._collect("advertise", set(spec.participants), to)
        b.sa, out = secagg.server_collect_keys(b.sa, got.values())
        self._relay(out)
        got = self._collect("share", {dev_of[u] for u in out}, to)
        b.sa, out = secagg.server_collect_shares(b.sa, got.values())
        self._relay(out)
        self._collect("update", {dev_of[u] for u in b.sa.u2}, b.deadline - time.monotonic())
        if len(b.replies) < self.cfg.quorum:
            return None
        b.sa, req = secagg.server_request_unmask(b.sa)
        self._relay({u: secagg.unmask_request_for(req, u) for u in b.sa.u3})
        got = self._collect("unmask", {dev_of[u] for u in b.sa.u3}, to)
        res = secagg.server_unmask(b.sa, got.values())
        b.sa = None  # the accumulator now holds the sum; nothing else about single devices remains
        contributors = [dev_of[u] for u in res.contributors]
        total = update_codec.reduce_ring(res.total, sa.ring_bits)
        summed = secagg.dequantize_sum(total, update_codec.quant_config(sa), len(contributors))
        weight = sum(update_codec.weight(b.replies[d].num_examples, sa.weight_norm) for d in contributors)
        assert b.idx is not None
        k = spec.sparse.k
        if sa.sketch_block:
            # Where the fleet's unsent mass is (a sum over devices, like everything else we learn).
            self.sketch = update_codec.expand_blocks(summed[k:] / weight, sa.sketch_block, spec.sparse.dim)
            np.save(self.out / "sparse_sketch.npy", self.sketch, allow_pickle=False)
        mean = sparse.scatter((summed[:k] / weight).astype(np.float32), b.idx, spec.sparse.dim)
        b.received = contributors
        return sparse.unflatten(mean, self.layout)

    def run_round(self, rnd: int) -> dict[str, Any]:
        from fl_lm.lora import set_adapter

        t0 = time.monotonic()
        participants = self.strategy.configure_round(rnd, list(self.online))
        self.book = b = RoundBook(rnd, participants, time.monotonic() + self.cfg.round_timeout_s)
        rec: dict[str, Any] = {"round": rnd, "participants": participants}
        mean: dict[str, np.ndarray] | None = None
        reason = ""
        try:
            if self.cfg.secagg and len(participants) < 2:
                raise secagg.SecAggAbort(f"{len(participants)} participant(s); secure aggregation needs at least 2")
            b.spec = spec = self.make_spec(rnd, participants)
            b.idx = update_codec.round_indices(spec.sparse)
            for d in participants:
                self.send_to(d, "round", spec)
            log.info("round %d: announced to %s (%s, %d of %d coordinates, secure aggregation %s)", rnd, participants,
                     spec.sparse.method, spec.sparse.k, spec.sparse.dim, "on" if spec.secagg else "OFF")
            if spec.secagg is not None:
                mean = self.secure_round()
            else:
                self.pump(b.deadline)
                if len(b.replies) >= self.cfg.quorum:
                    mean = weighted_mean(list(b.replies.values()))
            if mean is None:
                reason = f"{len(b.replies)} of {len(participants)} updates received, quorum is {self.cfg.quorum}"
        except secagg.SecAggAbort as e:
            mean, reason = None, f"secure aggregation aborted: {e}"
        except ProtocolError as e:  # e.g. unmask shares that rebuild a key not matching its public key
            mean, reason = None, f"secure aggregation failed: {type(e).__name__}: {e}"
        finally:
            self.book = None
        received = b.received if b.received is not None else sorted(b.replies)
        rec.update({"received": sorted(received), "dropped": sorted(set(participants) - set(received)),
                    "rejected_messages": b.rejected, "bytes_up": b.bytes_up, "bytes_down": b.bytes_down,
                    "bytes_by_kind": b.bytes_by_kind, "train_loss": b.train_loss,
                    "sparse": {"method": b.spec.sparse.method, "k": b.spec.sparse.k, "dim": b.spec.sparse.dim} if b.spec else None,
                    "secagg": b.spec is not None and b.spec.secagg is not None,
                    "wire_bytes_note": "MQTT PUBLISH packets (header+topic+payload), excluding TCP/TLS and acks"})
        if mean is None:
            log.error("round %d abandoned: %s; global model unchanged", rnd, reason)
            rec["status"], rec["abandon_reason"] = "abandoned", reason
        else:
            self.global_state = self.strategy.apply(self.global_state, mean)
            set_adapter(self.peft, self.global_state)
            checkpoint.save(self.out, rnd, self.peft)
            if self.cfg.sparse_method == "topk" and self.cfg.density < 1.0:
                self.scores = sparse.update_scores(self.scores, sparse.flatten(mean, self.layout), self.cfg.topk_beta)
                np.save(self.out / "sparse_scores.npy", self.scores, allow_pickle=False)
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
                self.link.publish(topics.bcast("shutdown"), self.wrap(M.Shutdown(reason="done"), self.round, secure.BROADCAST), timeout=5)
            except Exception as e:  # best effort; devices also have an idle timeout
                log.debug("shutdown broadcast failed: %s", e)
            self.link.close()
