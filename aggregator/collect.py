"""Collection: what arrives from devices, authenticated, reassembled and routed to the open round.

Network messages arrive on a queue (``fl_mqtt``) and are handled here, on one thread, in order.
Anything that fails to decode or validate is logged with its typed error and the round goes on.
The collector knows who is online (presence), who is enrolled and who may speak in the open
round's current stage; it does not know what a round does with an update: the round's
``accept`` callback (plain decoding, or folding into the secure sum) does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.metrics import Metrics
from aggregator.strategy import Reply
from shared import messages as M
from shared import secagg, secure, topics
from shared.secagg import hardened
from shared.chunking import Chunk, ChunkPolicy, Manifest, Reassembler, TransferRejected, decode_frame
from shared.crypto import DeviceKeys, PublicKeys
from shared.errors import ProtocolError, ReplayError, SchemaError

log = logging.getLogger(__name__)

Update = M.Update | M.SparseUpdate | M.MaskedUpdate


@dataclass
class RoundBook:
    """What happened in one round, as it happens."""

    rnd: int
    participants: list[str]
    deadline: float
    replies: dict[str, Reply] = field(default_factory=dict)
    train_loss: dict[str, float] = field(default_factory=dict)  # plain rounds only: secure ones send it masked
    dropped: set[str] = field(default_factory=set)
    reasons: dict[str, str] = field(default_factory=dict)  # device -> why it left the round (declined, offline, ...)
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    bytes_by_kind: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> up/down kind -> bytes
    rejected: int = 0
    spec: M.RoundSpec | None = None
    idx: np.ndarray | None = None  # the round's shared index set
    # Secure aggregation: the stage being collected, who must answer it, and what arrived.
    stage: str = "update"  # advertise, reveal, share, receipt, update, consistency, unmask
    expect: set[str] | None = None  # None: every participant
    inbox: dict[str, Any] = field(default_factory=dict)
    sa: Any = None  # shared.secagg.hardened.HardenedServer
    hardened: bool = True  # signed adverts and the consistency check; False only in insecure mode
    node_of: dict[str, int] = field(default_factory=dict)
    received: list[str] | None = None  # secure aggregation: the devices whose inputs are in the sum
    # How an accepted update becomes a Reply: the secure sum's fold; None: the collector's plain decoder.
    accept: Callable[[str, Any], Reply] | None = None
    # Largest upload (sealed update bytes) a participant may announce in a manifest this round.
    max_upload: int = 0
    fleet_train_loss: float | None = None  # weighted mean over the devices in the aggregate
    enough: int = 0  # over-selection: the update stage closes once this many updates are in (0: all)

    def closed_early(self) -> bool:
        return self.stage == "update" and self.enough > 0 and len(self.replies) >= self.enough

    def drop(self, device: str, reason: str) -> None:
        """The device leaves this round now: nobody waits for it (first reason kept)."""
        self.dropped.add(device)
        self.reasons.setdefault(device, reason)

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


class Collector:
    """The aggregator's side of the link: dispatch, reassembly, presence, and sending."""

    def __init__(self, *, enrolled: set[str], keys: DeviceKeys | None, pubkeys: dict[str, PublicKeys], chunk_bytes: int,
                 out_dir: Path, keep_received: bool = False,
                 accept_plain: Callable[[RoundBook, str, Any], Reply] | None = None, metrics: Metrics | None = None) -> None:
        self.enrolled = enrolled
        self.keys = keys  # None: insecure
        self.pubkeys = pubkeys
        self.policy = ChunkPolicy(max_message_bytes=chunk_bytes)
        # Bounded per device: one transfer at a time (a new manifest replaces the device's own older
        # one), admitted only from the open round's participants while updates are expected, and no
        # larger than the round's expected update (``admit``). Memory follows the chunks received.
        self.uploads = Reassembler(max_transfers=len(enrolled) + 2, max_transfer_bytes=1 << 30,
                                   max_total_bytes=4 << 30, idle_timeout_s=600, max_per_sender=1)
        self.last_seq: dict[str, int] = {}
        self.online: dict[str, int] = {}  # device -> num_examples it reported
        self.release_acks: dict[str, str] = {}  # device -> "installed ID" or "refused ID: why"
        # device -> the release it says is current ("" none), from its last "online" status: what
        # a release it lacks is resent against (issue 23). Absent: it has not said (yet).
        self.device_release: dict[str, str] = {}
        self._started_at: dict[str, float] = {}  # device -> when a new process of it last said "online" (monotonic)
        self.book: RoundBook | None = None
        self.link: Any = None
        self.digest = ""  # the student base every update must be for
        self.out = out_dir
        self.keep_received = keep_received
        self.accept_plain = accept_plain  # how a plain round's update becomes a Reply
        self.metrics = metrics or Metrics()  # aggregator.metrics: the /metrics series and /healthz
        self._ignored: set[str] = set()
        self.cleared_retained = 0  # retained messages we cleared off upload topics (see _clear_retained)
        self._cleared_topics: set[str] = set()
        self._suspects: dict[str, tuple[float, str, int]] = {}  # device -> (when its "offline" came, detail, round)
        self._online_at: dict[str, float] = {}  # device -> when its last "online" status came (monotonic)

    @property
    def insecure(self) -> bool:
        return self.keys is None

    # -- receiving -----------------------------------------------------------------------------
    def dispatch(self, topic: str, payload: bytes, wire_bytes: int, retain: bool = False) -> None:
        if not payload:
            return  # clears a retained message (a device's own, or ours echoed back): carries nothing
        self.metrics.wire("in", topic, wire_bytes)
        if retain and self._clear_retained(topic, len(payload)):
            return
        try:
            t = topics.parse(topic)
            if t.direction != topics.UP or t.device_id is None:
                raise SchemaError(f"not an upload topic: {topic}")
            if t.device_id not in self.enrolled:
                if t.device_id not in self._ignored:
                    log.warning("ignoring unenrolled device %s", t.device_id)
                    self._ignored.add(t.device_id)
                return
            if retain and t.kind != topics.PRESENCE:
                # Only for topics we did not clear (outside the upload prefix, never any of ours).
                raise SchemaError(f"retained message on {topic}: only status messages may be retained")
            if self.book is not None and t.device_id in self.book.participants:
                # Chunks are update bytes: devices chunk only updates.
                self.book.count(t.device_id, "up", "update" if t.kind == "chunk" else t.kind, wire_bytes)
            if t.kind == "chunk":
                frame = decode_frame(payload)
                if isinstance(frame, Manifest):
                    self.admit(t.device_id, frame)
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
                self.on_status(t.device_id, self.unwrap(payload, M.DeviceStatus, t.device_id, self._status_round),  # type: ignore[arg-type]
                               retained=retain)
            elif kind == "update":
                self.on_update(t.device_id, self.unwrap(payload, self._update_kind(payload), t.device_id, self._current_round))  # type: ignore[arg-type]
            elif kind == "secagg":
                self.on_secagg(t.device_id, self.unwrap(payload, M.SecAggMsg, t.device_id, self._current_round))  # type: ignore[arg-type]
            else:
                raise SchemaError(f"unknown upload kind {t.kind!r}")
        except ProtocolError as e:
            if self.book is not None:
                self.book.rejected += 1
            self.metrics.reject(e)
            log.warning("rejected message on %s: %s: %s", topic, type(e).__name__, e)

    # Topics remembered for "log once per topic"; past this many, clearing goes on unlogged.
    MAX_CLEARED_TOPICS = 10_000

    def _clear_retained(self, topic: str, size: int) -> bool:
        """Clear a retained message on an upload topic other than its device's own presence topic.

        Only a device's status (and its last will) is retained by the protocol. Anything else
        retained under ``up/`` (an update, a chunk, a secure-aggregation message, or a topic of no
        shape of ours) would sit in the broker and be replayed to every new subscription of ours,
        so we publish an empty retained message over it, which deletes it at the broker. Returns
        True when the message was such junk (the caller then ignores it), False when it is not
        ours to clear: a presence message, or a topic outside the upload prefix.
        """
        if not topics.is_up(topic):
            return False
        try:
            t = topics.parse(topic)
            if t.kind == topics.PRESENCE:
                return False
        except SchemaError:
            pass  # malformed under our prefix: junk too
        device = topics.up_device(topic) or "?"  # only a well-formed id is named (it goes in logs)
        self.cleared_retained += 1
        first = topic not in self._cleared_topics
        if first and len(self._cleared_topics) < self.MAX_CLEARED_TOPICS:
            self._cleared_topics.add(topic)
        try:
            if self.link is None:
                raise RuntimeError("no broker link")
            self.link.publish(topic, b"", retain=True, timeout=self.CLEAR_TIMEOUT_S)
            done = "cleared"
        except Exception as e:  # noqa: BLE001 - best effort; it is replayed (and tried) again next time
            done = f"could not clear ({type(e).__name__}: {e})"
        if first:
            log.warning("%s a retained message of %d bytes on %r (device %s): only a device's status may be "
                        "retained (%d cleared so far)", done, size, topic[:200], device, self.cleared_retained)
        return True

    CLEAR_TIMEOUT_S = 5.0  # a clear waits at most this long for the broker (the collector waits meanwhile)

    def admit(self, device: str, m: Manifest) -> None:
        """Only a participant, while the round takes updates, for at most the round's update size."""
        b = self.book
        if b is None or device not in b.participants:
            raise TransferRejected(f"upload from {device}: not a participant of an open round")
        if b.stage != "update" or device in b.replies or device in b.dropped:
            raise TransferRejected(f"upload from {device} outside its update stage ({b.stage})")
        if b.max_upload and m.total_size > b.max_upload:
            raise TransferRejected(f"upload from {device} announces {m.total_size} bytes; round {b.rnd} updates "
                                   f"are at most {b.max_upload}")

    def _update_kind(self, data: bytes) -> type[M.Message]:
        """Which update message an upload claims to hold (checked again when it is opened)."""
        kind = type(M.decode(data)).KIND if self.insecure else secure.peek(data)[0].kind
        cls = M.KINDS.get(kind)
        if cls not in M.UPDATE_KINDS:
            raise SchemaError(f"{kind!r} is not an update message")
        return cls  # type: ignore[return-value]

    def unwrap(self, data: bytes, expect: type[M.Message], device: str, check_round: Any) -> M.Message:
        """Authenticate and decode an upload, or raise a typed ProtocolError."""
        if self.insecure:
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

    def on_status(self, device: str, st: M.DeviceStatus, retained: bool = False) -> None:
        if st.device_id != device:
            raise ReplayError(f"status for {st.device_id} arrived on {device}'s topic")
        if st.state == "offline":
            back_at = float(getattr(self.link, "last_reconnect", 0.0))
            if not retained and back_at and time.monotonic() - back_at < self.RECONNECT_SETTLE_S:
                # Just after our own reconnect the broker delivers what it queued for our session
                # while we were away: after its restart, that is every device's will, sent as it
                # shut down, and it can come after the device's own "online" (its birth message).
                # Like a retained one it is the broker's memory, not news: a device that said
                # "online" since we are back stays online; one that did not is not a dropout yet
                # (it misses the stage and is dropped at the deadline if it really is gone).
                if self._online_at.get(device, 0.0) >= back_at:
                    log.info("device %s: offline status queued during the broker outage, after it was back online; ignored", device)
                    return
                retained = True
            self.online.pop(device, None)
            if retained and self.book is not None:
                # A retained "offline" is the broker's memory, replayed because we (re)subscribed:
                # after a broker restart every device's will is there, though most are back. A
                # device that really is gone misses the stage and is dropped at its deadline; one
                # that is back says "online" again (fl_mqtt.link's birth message).
                log.info("round %d: retained offline status of %s (from before our reconnect); not a dropout yet",
                         self.book.rnd, device)
            elif self.book is not None and device in self.book.participants:
                # Also when it is not awaited right now: a later secure-aggregation stage would be.
                # Confirmed after OFFLINE_GRACE_S unless our own link drops meanwhile: a broker
                # that shuts down sends every client's will first (even with a will delay), and
                # then the "offline" says the broker left, not the device.
                self._suspects[device] = (time.monotonic(), st.detail, self.book.rnd)
        elif st.state == "declined":
            self.metrics.decline(st.detail)
            # Whatever stage is being collected: a device declines while training, after it has
            # answered the key stages, and the update stage must not wait for it.
            b = self.book
            # After its update is in, a device can still refuse the consistency check or the
            # unmask (it says why): nobody waits for it there either.
            if b is not None and device in b.participants and (device not in b.replies or b.stage in ("consistency", "unmask")):
                b.drop(device, f"declined: {st.detail}")
                log.warning("round %d: device %s declined: %s", b.rnd, device, st.detail)
        elif st.state == "release":
            self.release_acks[device] = st.detail
            log.info("device %s: release %s", device, st.detail)
        else:
            if device not in self.online:
                log.info("device %s online (%s)", device, st.profile)
            self.online[device] = st.num_examples
            self._online_at[device] = time.monotonic()
            if st.release is not None:
                self.device_release[device] = st.release
            if st.detail == M.STARTED and not retained:
                self._started_at[device] = time.monotonic()
            self._suspects.pop(device, None)
            b = self.book
            resumes = M.resumed_round(st.detail)
            if (not retained and b is not None and device in b.participants and device not in b.dropped
                    and (st.detail == M.STARTED or resumes is not None)):
                if resumes == b.rnd and b.spec is not None and b.spec.secagg is None:
                    # A new process that continues this (plain) round from its training checkpoint:
                    # its update is still to come, so it stays in the round.
                    log.info("round %d: device %s restarted and resumes the round (%s)", b.rnd, device, st.detail)
                else:
                    # A new process of a device that was in this round: its round secrets died with
                    # the old one (or it resumes another round), so it cannot finish this one; nobody
                    # waits for it. It is online for the next round.
                    b.drop(device, "restarted during the round")
                    log.warning("round %d: device %s restarted; it is a dropout this round", b.rnd, device)

    OFFLINE_GRACE_S = 2.0
    # How long after our link comes back a live "offline" is taken for the broker's queued memory
    # of the outage (its delivery of our session's queue can take seconds on a loaded machine).
    RECONNECT_SETTLE_S = 15.0

    def _settle_suspects(self) -> None:
        """Offline statuses become dropouts once the grace has passed with our link up throughout."""
        if not self._suspects:
            return
        now, b = time.monotonic(), self.book
        lost_at = float(getattr(self.link, "last_disconnect", 0.0))
        for device, (t, detail, rnd) in list(self._suspects.items()):
            if b is None or b.rnd != rnd:
                del self._suspects[device]  # that round is over; `online` already forgot the device
            elif lost_at >= t - 1.0:
                # Our own link went down around it: the broker went away; the device's birth
                # message says "online" again when it is back, and the stage deadline covers the rest.
                del self._suspects[device]
                log.info("device %s: offline status while the broker went down; not a dropout", device)
            elif now - t >= self.OFFLINE_GRACE_S:
                del self._suspects[device]
                if device in b.participants:
                    b.drop(device, f"offline: {detail}" if detail else "offline")
                    log.warning("round %d: device %s went offline (%s); treating it as a dropout", b.rnd, device, detail)

    def on_update(self, device: str, up: Update) -> None:
        b = self.book
        if up.device_id != device:
            raise ReplayError(f"update for {up.device_id} arrived on {device}'s topic")
        if b is None or up.round != b.rnd or b.spec is None:
            raise ReplayError(f"update from {device} for round {up.round}; current round is {b.rnd if b else 'none'}")
        if device not in b.participants:
            raise ReplayError(f"{device} is not a participant of round {b.rnd}")
        if device in b.replies:
            # A replay of what we already hold (or a second try): no effect on the round.
            if up.seq <= self.last_seq.get(device, 0):
                raise ReplayError(f"repeated (device, round, seq) = ({device}, {up.round}, {up.seq})")
            raise ReplayError(f"second update from {device} in round {b.rnd}")
        if b.stage != "update":
            raise ReplayError(f"update from {device} after round {b.rnd}'s update stage ({b.stage}); ignored")
        try:
            reply = self._accept(b, device, up)
        except ProtocolError as e:
            # Authenticated, for this round, and still wrong (a stale base, a counter behind after
            # a restart, a wrong size): the device cannot contribute this round, so nobody waits for it.
            if device not in b.dropped:
                b.drop(device, f"rejected: {type(e).__name__}: {e}")
                log.warning("round %d: update from %s rejected (%s); it is a dropout this round", b.rnd, device, e)
            raise
        self.last_seq[device] = up.seq
        b.replies[device] = reply
        if not isinstance(up, M.MaskedUpdate):
            b.train_loss[device] = up.train_loss
        if self.keep_received:
            d = self.out / "received" / f"round_{b.rnd:04d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{device}.msgpack").write_bytes(M.encode(up))
        log.info("round %d: %s from %s (%d/%d)", b.rnd, type(up).KIND, device, len(b.replies), len(b.participants))

    def _accept(self, b: RoundBook, device: str, up: Update) -> Reply:
        if up.seq <= self.last_seq.get(device, 0):
            raise ReplayError(f"repeated (device, round, seq) = ({device}, {up.round}, {up.seq})")
        if up.base_digest != self.digest:
            raise SchemaError(f"update from {device} is for base {up.base_digest[:12]}")
        if up.num_examples < 1:
            raise SchemaError(f"update from {device} claims {up.num_examples} examples")
        spec = b.spec
        assert spec is not None
        want = M.MaskedUpdate if spec.secagg is not None else (M.Update if spec.sparse.method == "dense" else M.SparseUpdate)
        if not isinstance(up, want):
            raise SchemaError(f"round {b.rnd} takes {want.KIND!r} updates, {device} sent {type(up).KIND!r}")
        if b.accept is not None:
            return b.accept(device, up)
        if self.accept_plain is not None:
            return self.accept_plain(b, device, up)
        raise ReplayError(f"update from {device}: round {b.rnd} takes no updates")

    def on_secagg(self, device: str, msg: M.SecAggMsg) -> None:
        b = self.book
        if b is None or b.spec is None or b.spec.secagg is None or msg.round != b.rnd:
            raise ReplayError(f"secure-aggregation message from {device} for round {msg.round}, no such round open")
        if msg.device_id != device:
            raise ReplayError(f"secure-aggregation message for {msg.device_id} arrived on {device}'s topic")
        inner = secagg.decode(msg.body)
        adv = hardened.SignedAdvertise if b.hardened else secagg.AdvertiseKeys
        want = {"advertise": adv, "reveal": hardened.SeedReveal, "share": secagg.ShareKeys, "receipt": secagg.BundleReceipt,
                "consistency": hardened.ConsistencySig,
                "unmask": secagg.UnmaskShares}.get(b.stage)
        if want is None or not isinstance(inner, want):
            raise ReplayError(f"{type(inner).__name__} from {device} during stage {b.stage!r}")
        if device not in b.waiting_for():
            raise ReplayError(f"{device} is not expected in stage {b.stage!r} (already answered or not in it)")
        if inner.round_id != b.rnd or inner.sender != b.node_of[device]:
            raise ReplayError(f"{device} sent a stage message as node {inner.sender} of round {inner.round_id}")
        b.inbox[device] = inner

    # -- waiting -------------------------------------------------------------------------------
    def pump(self, until: float) -> None:
        """Handle incoming messages until ``until`` (monotonic) or until the round needs nobody else."""
        while time.monotonic() < until:
            if self.book is not None and (not self.book.waiting_for() or self.book.closed_early()):
                return
            inc = self.link.get(timeout=min(0.25, max(0.01, until - time.monotonic())))
            if inc is not None:
                self.dispatch(inc.topic, inc.payload, inc.wire_bytes, getattr(inc, "retain", False))
            self._settle_suspects()
            for sender, xfer in self.uploads.expire():
                log.warning("dropped incomplete upload %s from %s (idle too long)", xfer, sender)

    def drain(self) -> None:
        """Handle whatever has already arrived, without waiting."""
        while (inc := self.link.get(timeout=0)) is not None:
            self.dispatch(inc.topic, inc.payload, inc.wire_bytes, getattr(inc, "retain", False))

    def wait_for_devices(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self.metrics.progress("waiting for devices")
        while len(self.online) < n and time.monotonic() < deadline:
            inc = self.link.get(timeout=0.5)
            if inc is not None:
                self.dispatch(inc.topic, inc.payload, inc.wire_bytes, getattr(inc, "retain", False))
            self.uploads.expire()
        if len(self.online) < n:
            log.warning("only %d of %d devices online after %.0fs; starting anyway", len(self.online), n, timeout_s)

    def collect(self, stage: str, expect: set[str], timeout_s: float) -> dict[str, Any]:
        """Wait for one message of ``stage`` from each of ``expect`` for at most ``timeout_s``.

        Each stage has its own budget: a stage after the updates does not inherit the round's
        spent deadline (which once gave the unmask stage no time at all). Devices that decline,
        go offline or are rejected leave ``waiting_for`` at once, so nobody waits for them.
        """
        b = self.book
        assert b is not None
        b.stage, b.expect, b.inbox = stage, set(expect), {}
        with self.metrics.stage(stage, timeout_s):
            self.pump(time.monotonic() + max(0.0, timeout_s))
        missing = b.waiting_for()
        if missing and b.closed_early():
            log.info("round %d: %d updates in, enough (over-selection); %s are stragglers this round", b.rnd,
                     len(b.replies), sorted(missing))
            for d in missing:
                b.drop(d, f"straggler: the round closed after {b.enough} updates (over-selection)")
        elif missing:
            log.warning("round %d: no %s message from %s; treating them as dropouts", b.rnd, stage, sorted(missing))
            for d in missing:
                b.reasons.setdefault(d, f"no {stage} message within {timeout_s:.3g} s")
        return b.inbox if stage != "update" else b.replies

    # -- sending -------------------------------------------------------------------------------
    def wrap(self, msg: M.Message, rnd: int, device: str) -> bytes:
        """Sign what we send (announcements are public but must not be forgeable)."""
        if self.keys is None:
            return M.encode(msg)
        return secure.sign_message(msg, round=rnd, device_id=device, key=self.keys)

    def send_to(self, device: str, kind: str, msg: M.Message) -> int:
        from fl_mqtt.transfer import send

        b = self.book
        assert b is not None
        n = send(self.link, topics.down(device, kind), topics.down(device, "chunk"), self.wrap(msg, b.rnd, device), self.policy)
        b.count(device, "down", kind, n)
        self.metrics.wire("out", kind, n)
        return n

    RELEASE_RESENDS = 2  # per device and delivery: a device that restarts more often than this waits for the next one

    def send_release(self, devices: list[str], msg: M.Release, rnd: int, release_id: str, timeout_s: float) -> dict[str, Any]:
        """Send the release to each device (chunked, signed for that device) and wait for their answers.

        A device that restarts meanwhile (a new process says "online", e.g. it was killed while
        installing) lost what it had received: it is sent the release again at once, instead of
        being waited for until the deadline and then forgotten (issue 23)."""
        from fl_mqtt.transfer import send

        def send_one(d: str) -> int:
            return send(self.link, topics.down(d, "release"), topics.down(d, "chunk"), self.wrap(msg, rnd, d), self.policy)

        sent = {d: send_one(d) for d in devices}
        sent_at = {d: time.monotonic() for d in devices}
        resent = {d: 0 for d in devices}
        deadline = time.monotonic() + timeout_s

        def answered() -> set[str]:
            return {d for d in devices if release_id in self.release_acks.get(d, "")}

        while answered() != set(devices) and time.monotonic() < deadline:
            inc = self.link.get(timeout=0.5)
            if inc is not None:
                self.dispatch(inc.topic, inc.payload, inc.wire_bytes, getattr(inc, "retain", False))
            for d in set(devices) - answered():
                if self._started_at.get(d, 0.0) > sent_at[d] and resent[d] < self.RELEASE_RESENDS:
                    resent[d] += 1
                    log.warning("device %s restarted before it answered release %s: sending it again", d, release_id)
                    sent[d] += send_one(d)
                    sent_at[d] = time.monotonic()
                    deadline = max(deadline, sent_at[d] + timeout_s / 2)
        self.metrics.wire("out", "release", sum(sent.values()))
        acks = {d: self.release_acks.get(d, "") for d in devices}
        return {"down_bytes": sent,
                "installed": sorted(d for d, a in acks.items() if a == f"installed {release_id}"),
                "refused": {d: a for d, a in acks.items() if a.startswith("refused") and release_id in a},
                "no_answer": sorted(d for d in devices if release_id not in acks[d]),
                **({"resent": {d: k for d, k in resent.items() if k}} if any(resent.values()) else {})}

    def broadcast_shutdown(self, rnd: int) -> None:
        try:
            self.link.publish(topics.bcast("shutdown"), self.wrap(M.Shutdown(reason="done"), rnd, secure.BROADCAST), timeout=5)
        except Exception as e:  # best effort; devices also have an idle timeout
            log.debug("shutdown broadcast failed: %s", e)
