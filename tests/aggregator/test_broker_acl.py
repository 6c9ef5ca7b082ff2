"""aggregator.broker_config against a real Mosquitto: authentication, TLS and per-device ACLs.

Authorization is judged by what is *delivered*, never by a SUBACK: Mosquitto grants a forbidden
subscription and then filters delivery, and drops a denied QoS 0 publish silently. To prove a
negative without sleeping, each check is followed by a sentinel on the same path that is allowed;
the broker keeps per-publisher order into a subscriber's queue, so when the sentinel arrives
anything forbidden would already have been delivered.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from aggregator.broker_config import (
    MESSAGE_SLACK,
    BrokerFiles,
    MqttCredentials,
    mosquitto_password_hash,
    verify_mosquitto_password,
    write_broker_config,
)
from shared import topics
from shared.errors import ConfigError
from tests.brokers import Mosquitto, start_mosquitto

log = logging.getLogger(__name__)
TIMEOUT = 5.0
A, B = "dev-a", "dev-b"


@dataclass
class Broker:
    files: BrokerFiles
    mosq: Mosquitto

    def creds(self, user: str) -> MqttCredentials:
        path = self.files.aggregator_credentials if user == self.files.aggregator_user else self.files.credentials[user]
        return MqttCredentials.load(path)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    files = write_broker_config(tmp_path / "broker", [A, B])
    # start_mosquitto writes `listener PORT 127.0.0.1` and then our body, whose TLS options make
    # that the only listener, and a TLS-only one.
    mosq = start_mosquitto(tmp_path / "run", files.body)
    try:
        yield Broker(files, mosq)
    finally:
        mosq.stop()


class Peer:
    """A paho 2.2 client (callback API v2, MQTT v5) with blocking helpers for tests."""

    def __init__(self, broker: Broker, username: str | None, password: str | None, *, client_id: str) -> None:
        self.port = broker.mosq.port
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if broker.files.tls:
            assert broker.files.ca_cert is not None
            self.client.tls_set(ca_certs=str(broker.files.ca_cert))
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connack: queue.Queue[ReasonCode] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._lock = threading.Condition()
        self._pubacks: dict[int, ReasonCode] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self.client.on_connect = lambda c, u, flags, rc, props: self.connack.put(rc)
        self.client.on_message = lambda c, u, msg: self.messages.put((msg.topic, msg.payload))
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    @classmethod
    def login(cls, broker: Broker, user: str) -> Peer:
        c = broker.creds(user)
        peer = cls(broker, c.username, c.password, client_id=f"test-{user}")
        rc = peer.connect()
        assert not rc.is_failure, f"{user} could not connect: {rc}"
        return peer

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, rc: ReasonCode, props: object) -> None:
        with self._lock:
            self._pubacks[mid] = rc
            self._lock.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, rcs: list[ReasonCode], props: object) -> None:
        with self._lock:
            self._subacks[mid] = rcs
            self._lock.notify_all()

    def connect(self) -> ReasonCode:
        self.client.connect("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        return self.connack.get(timeout=TIMEOUT)

    def _wait(self, table: dict, mid: int):  # type: ignore[no-untyped-def]
        with self._lock:
            assert self._lock.wait_for(lambda: mid in table, timeout=TIMEOUT), f"no ack for mid {mid}"
            return table.pop(mid)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=qos)
        return self._wait(self._pubacks, info.mid)

    def subscribe(self, topic_filter: str) -> list[ReasonCode]:
        _, mid = self.client.subscribe(topic_filter, qos=1)
        return self._wait(self._subacks, mid)

    def received_until(self, sentinel_topic: str) -> list[str]:
        """Topics delivered before ``sentinel_topic`` arrives (which it must)."""
        seen: list[str] = []
        deadline = time.monotonic() + TIMEOUT
        while True:
            topic, _ = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if topic == sentinel_topic:
                return seen
            seen.append(topic)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers(broker: Broker) -> Iterator[dict[str, Peer]]:
    made = {name: Peer.login(broker, name) for name in ("aggregator", A, B)}
    try:
        yield made
    finally:
        for p in made.values():
            p.close()


# --- authentication and transport ------------------------------------------------------------------


def test_acl_anonymous_connect_refused(broker: Broker) -> None:
    peer = Peer(broker, None, None, client_id="anon")
    try:
        rc = peer.connect()
    finally:
        peer.close()
    assert rc.is_failure, rc
    assert rc.getName() in ("Not authorized", "Bad user name or password"), rc


@pytest.mark.parametrize("who", ["wrong_password", "unknown_user", "other_devices_password"])
def test_acl_bad_credentials_refused(broker: Broker, who: str) -> None:
    a, b = broker.creds(A), broker.creds(B)
    user, password = {
        "wrong_password": (A, a.password + "x"),
        "unknown_user": ("dev-zzz", a.password),
        "other_devices_password": (A, b.password),
    }[who]
    peer = Peer(broker, user, password, client_id=f"bad-{who}")
    try:
        rc = peer.connect()
    finally:
        peer.close()
    assert rc.is_failure, rc
    assert rc.getName() in ("Not authorized", "Bad user name or password"), rc


def _mqtt311_connect_packet(client_id: str, username: str, password: str) -> bytes:
    def s(x: str) -> bytes:
        return len(x.encode()).to_bytes(2, "big") + x.encode()

    var = s("MQTT") + bytes([4, 0b11000010]) + (10).to_bytes(2, "big")
    body = var + s(client_id) + s(username) + s(password)
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


def test_acl_plaintext_connect_refused_on_tls_listener(broker: Broker) -> None:
    # Valid credentials, but in clear text: the TLS-only listener must never answer with a CONNACK.
    c = broker.creds(A)
    with socket.create_connection(("127.0.0.1", broker.mosq.port), timeout=TIMEOUT) as sock:
        sock.sendall(_mqtt311_connect_packet("plain", c.username, c.password))
        try:
            reply = sock.recv(64)
        except (ConnectionResetError, socket.timeout):
            reply = b""
    assert not reply.startswith(b"\x20"), f"got a CONNACK over plaintext: {reply!r}"
    log.info("plaintext CONNECT answered with %r (empty = closed; 0x15 = TLS alert)", reply[:8])


# --- ACLs, judged by delivery ----------------------------------------------------------------------


def test_acl_device_cannot_publish_into_other_device_upload(peers: dict[str, Peer]) -> None:
    agg, a = peers["aggregator"], peers[A]
    assert all(not rc.is_failure for rc in agg.subscribe(topics.up_filter()))
    forged = topics.up(B, "update")
    rc = a.publish(forged, b"forged by A")
    log.info("A -> %s at QoS 1: PUBACK reason %r", forged, rc.getName())
    assert rc.getName() == "Not authorized"  # MQTT v5 tells a denied QoS 1 publish
    rc0 = a.client.publish(forged, b"forged by A, qos0", qos=0)  # QoS 0: silently dropped
    rc0.wait_for_publish(TIMEOUT)
    # Positive control on the same path: A's own upload reaches the aggregator, and nothing
    # forged arrived before it.
    own = topics.up(A, "update")
    assert not a.publish(own, b"real update").is_failure
    assert agg.received_until(own) == []


def test_acl_device_cannot_write_download_or_broadcast(peers: dict[str, Peer]) -> None:
    a, b = peers[A], peers[B]
    b.subscribe(topics.down_filter(B))
    b.subscribe(topics.bcast_filter())
    for topic in (topics.down(B, "cmd"), topics.down(A, "cmd"), topics.bcast("announce"), "flm/v1/other", "x/y"):
        assert a.publish(topic, b"evil").getName() == "Not authorized", topic
    sentinel = topics.down(B, "sentinel")
    peers["aggregator"].publish(sentinel, b"")
    assert b.received_until(sentinel) == []


def test_acl_device_cannot_read_other_download_or_any_upload(peers: dict[str, Peer]) -> None:
    agg, a, b = peers["aggregator"], peers[A], peers[B]
    agg.subscribe(topics.up_filter())
    suback = {f: a.subscribe(f) for f in (topics.down_filter(B), topics.up_filter(), topics.up_filter(B), "#")}
    # Make the outcome visible: Mosquitto 2.0 grants these SUBACKs and filters delivery later.
    granted = {f: not rcs[0].is_failure for f, rcs in suback.items()}
    log.info("A's forbidden SUBACKs (True = granted then filtered, False = refused): %s", granted)
    assert a.subscribe(topics.down_filter(A))[0].is_failure is False

    # B's download: the aggregator sends B something, then A a sentinel (same publisher, so order
    # into A's queue is preserved).
    agg.publish(topics.down(B, "secret"), b"for B only")
    # B's upload: B publishes (PUBACK means routed), the aggregator receives it (it was published).
    assert not b.publish(topics.up(B, "update"), b"B's update").is_failure
    assert agg.received_until(topics.up(B, "update")) == []
    sentinel = topics.down(A, "sentinel")
    agg.publish(sentinel, b"")
    leaked = a.received_until(sentinel)
    assert leaked == [], f"A received {leaked} (SUBACK granted: {granted})"


def test_acl_aggregator_reaches_only_the_addressed_device(peers: dict[str, Peer]) -> None:
    agg, a, b = peers["aggregator"], peers[A], peers[B]
    for p, dev in ((a, A), (b, B)):
        p.subscribe(topics.down_filter(dev))
        p.subscribe(topics.bcast_filter())
    b.subscribe(topics.down_filter(A))  # forbidden for B: must not deliver A's messages
    to_a = topics.down(A, "release")
    assert not agg.publish(to_a, b"for A").is_failure
    assert a.messages.get(timeout=TIMEOUT) == (to_a, b"for A")
    announce = topics.bcast("announce")
    assert not agg.publish(announce, b"round 1").is_failure
    assert a.received_until(announce) == []
    assert b.received_until(announce) == []  # B got nothing addressed to A before the broadcast
    # The aggregator may not write a device's presence, nor anything outside the protocol's upload
    # kinds (it writes those only to clear retained junk: test_retained_junk_*).
    for topic in (topics.up(A, "status"), f"{topics.up(A, 'update')}/x", "flm/v1/up/dev-a/junk"):
        assert agg.publish(topic, b"x").getName() == "Not authorized", topic


def test_acl_without_tls_still_requires_passwords_and_acls(tmp_path: Path) -> None:
    # tls=False is for a loopback-only broker (tests, one-machine demo); auth and ACLs still apply.
    files = write_broker_config(tmp_path / "broker", [A, B], tls=False)
    assert files.ca_cert is None and "cafile" not in files.body
    mosq = start_mosquitto(tmp_path / "run", files.body)
    try:
        broker = Broker(files, mosq)
        anon = Peer(broker, None, None, client_id="anon")
        try:
            assert anon.connect().is_failure
        finally:
            anon.close()
        a = Peer.login(broker, A)
        try:
            assert a.publish(topics.up(B, "update"), b"x").getName() == "Not authorized"
            assert not a.publish(topics.up(A, "update"), b"x").is_failure
        finally:
            a.close()
    finally:
        mosq.stop()


# --- files -----------------------------------------------------------------------------------------


def test_acl_written_files_and_modes(tmp_path: Path) -> None:
    files = write_broker_config(tmp_path / "b", [A, B], port=18883)
    for secret in (files.ca_key, files.server_key, files.password_file, files.aggregator_credentials,
                   *files.credentials.values()):
        assert secret is not None
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert "listener" not in [line.split()[0] for line in files.body.splitlines() if line and line[0] != "#"]
    assert files.conf_path.read_text().startswith("listener 18883 127.0.0.1\n")
    assert "allow_anonymous false" in files.body
    creds = MqttCredentials.load(files.credentials[A])
    assert (creds.username, creds.port, creds.tls, creds.ca_file) == (A, 18883, True, str(files.ca_cert))
    assert creds.password not in repr(creds)
    users = [line.split(":", 1)[0] for line in files.password_file.read_text().splitlines()]
    assert users == ["aggregator", A, B]
    assert "pattern" not in files.acl_file.read_text().split("\n", 3)[-1]


def test_acl_rejects_bad_ids(tmp_path: Path) -> None:
    from shared.errors import ConfigError

    with pytest.raises(ValueError):
        write_broker_config(tmp_path, ["a/b"])
    with pytest.raises(ConfigError):
        write_broker_config(tmp_path, ["aggregator"])
    with pytest.raises(ConfigError):
        write_broker_config(tmp_path, [A, A])


def test_acl_password_hash_compatible_with_mosquitto_passwd(tmp_path: Path) -> None:
    enc = mosquitto_password_hash("s3cret", salt=bytes(12))
    assert enc.startswith("$7$101$AAAAAAAAAAAAAAAA$")
    assert verify_mosquitto_password("s3cret", enc) and not verify_mosquitto_password("s3cre", enc)
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed (the broker tests above still prove the format)")
    pw_file = tmp_path / "pw"
    pw_file.touch(mode=0o600)
    subprocess.run([tool, "-b", str(pw_file), "u1", "hunter2"], check=True, capture_output=True, timeout=10)
    theirs = pw_file.read_text().strip().split(":", 1)[1]
    assert theirs.startswith("$7$")
    assert verify_mosquitto_password("hunter2", theirs)
    assert not verify_mosquitto_password("hunter3", theirs)


# --- hardening: client ids, sizes, overwrites ------------------------------------------------------


def _disconnects(peer: Peer) -> threading.Event:
    gone = threading.Event()
    peer.client.on_disconnect = lambda c, u, flags, rc, props: gone.set()
    return gone


@pytest.mark.parametrize("victim", ["aggregator", B])
def test_client_id_takeover_is_refused(broker: Broker, peers: dict[str, Peer], victim: str) -> None:
    """Device A's credentials with the victim's client id: the broker makes it A's own id, so the
    victim (device B, or the aggregator) stays connected and keeps getting its messages."""
    gone = _disconnects(peers[victim])
    c = broker.creds(A)
    thief = Peer(broker, c.username, c.password, client_id=victim if victim != "aggregator" else "aggregator")
    assert not thief.connect().is_failure
    try:
        assert not gone.wait(1.5), f"{victim} was kicked off by a client using its id"
        topic = topics.down(B, "round") if victim == B else topics.up(A, "status")
        assert peers[victim].subscribe(topic)[0].value < 0x80
        sender = peers["aggregator"] if victim == B else thief
        assert not sender.publish(topic, b"still here").is_failure
        t, payload = peers[victim].messages.get(timeout=TIMEOUT)
        assert (t, payload) == (topic, b"still here")
    finally:
        thief.close()


def test_messages_over_the_size_limit_are_not_delivered(broker: Broker, peers: dict[str, Peer]) -> None:
    """The broker drops an over-limit publish (at QoS 1 it answers PUBACK 0x95, packet too large,
    which paho takes as a reason to reconnect and retry; QoS 0 keeps this test simple)."""
    agg, dev = peers["aggregator"], peers[A]
    assert agg.subscribe(topics.up_filter())[0].value < 0x80
    dev.client.publish(topics.up(A, "chunk"), os.urandom(256 * 1024 + MESSAGE_SLACK + 1), qos=0)  # over the limit
    dev.publish(topics.up(A, "chunk"), os.urandom(256 * 1024))  # a full chunk still fits
    sentinel = topics.up(A, "status")
    dev.publish(sentinel, b"end")
    got = agg.received_until(sentinel)
    assert got == [topics.up(A, "chunk")]  # only the one within the limit


def test_broker_config_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first = write_broker_config(tmp_path / "b", [A])
    key = first.ca_key.read_bytes() if first.ca_key else b""
    with pytest.raises(ConfigError, match="--force"):
        write_broker_config(tmp_path / "b", [A])
    assert first.ca_key is not None and first.ca_key.read_bytes() == key  # nothing was replaced
    again = write_broker_config(tmp_path / "b", [A], force=True)
    assert again.ca_key is not None and again.ca_key.read_bytes() != key
    conf = again.conf_path.read_text()
    assert "use_username_as_clientid true" in conf and "message_size_limit" in conf


def test_enroll_refuses_to_replace_a_key_without_replace(tmp_path: Path) -> None:
    from aggregator import registry
    from shared.crypto import generate_keys

    k1, k2 = generate_keys().public, generate_keys().public
    reg = tmp_path / "reg.json"
    registry.enroll(reg, A, k1)
    registry.enroll(reg, A, k1)  # the same key again: fine
    with pytest.raises(ConfigError, match="--replace"):
        registry.enroll(reg, A, k2)
    assert registry.load(reg)[A].to_json() == k1.to_json()
    registry.enroll(reg, A, k2, replace=True)
    assert registry.load(reg)[A].to_json() == k2.to_json()


def test_unenroll_removes_one_device_and_names_an_unknown_one(tmp_path: Path) -> None:
    from aggregator import registry
    from aggregator.cli import main as fl_agg
    from shared.crypto import generate_keys

    reg = tmp_path / "reg.json"
    registry.enroll(reg, A, generate_keys().public)
    registry.enroll(reg, "device-b", generate_keys().public)
    assert fl_agg(["unenroll", A, "--registry", str(reg)]) == 0
    assert set(registry.load(reg)) == {"device-b"}
    with pytest.raises(ConfigError, match=f"{A} is not enrolled.*enrolled: device-b"):
        registry.unenroll(reg, A)
    assert fl_agg(["unenroll", A, "--registry", str(reg)]) != 0  # one line, no traceback, nothing lost
    assert set(registry.load(reg)) == {"device-b"}


# --- retained junk (issue 22, item 7) --------------------------------------------------------------
#
# A device used to be able to leave hundreds of retained messages under its own prefix, each replayed
# to every new subscription of the aggregator. The ACL now grants it exactly the protocol's upload
# topics, and the aggregator clears whatever is retained there besides the device's own status.

JUNK = 270 * 1024  # within message_size_limit: the largest junk a device can still retain


def _retain(peer: Peer, topic: str, payload: bytes) -> ReasonCode:
    info = peer.client.publish(topic, payload, qos=1, retain=True)
    return peer._wait(peer._pubacks, info.mid)  # noqa: SLF001


def _delivered_before(subscriber: Peer, publisher: Peer, topic: str) -> list[tuple[str, bytes]]:
    """What ``subscriber`` gets before a sentinel that ``publisher`` sends on ``topic`` now (told
    apart by its payload, since junk may be retained on that same topic)."""
    end = b"sentinel " + os.urandom(8).hex().encode()
    assert not publisher.publish(topic, end).is_failure
    seen: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + TIMEOUT
    while (got := subscriber.messages.get(timeout=max(0.01, deadline - time.monotonic()))) != (topic, end):
        seen.append(got)
    return seen


def test_a_device_cannot_retain_junk_on_a_subtopic_outside_the_protocol(broker: Broker, peers: dict[str, Peer]) -> None:
    a = peers[A]
    status = topics.up(A, "status")
    assert not _retain(a, status, b"A is online").is_failure  # positive control: retained and replayed
    junk = [f"flm/v1/up/{A}/junk-{i}" for i in range(20)] + [f"{topics.up(A, 'update')}/x", f"flm/v1/up/{A}/a/b/c"]
    for topic in junk:
        _retain(a, topic, os.urandom(JUNK))  # PUBACK or not: judged by what a subscriber gets
    # A NEW subscription: the broker sends what it retains as it subscribes, before anything later.
    agg = peers["aggregator"]
    assert agg.subscribe(topics.up_filter())[0].value < 0x80
    assert _delivered_before(agg, a, topics.up(A, "update")) == [(status, b"A is online")]


def test_retained_junk_on_an_allowed_topic_is_cleared_by_the_aggregator(broker: Broker, peers: dict[str, Peer]) -> None:
    from aggregator.collect import Collector
    from fl_mqtt.link import MqttLink

    a = peers[A]
    status_topic, status = topics.up(A, "status"), b"A's own retained status"
    assert not _retain(a, status_topic, status).is_failure
    junk = [topics.up(A, kind) for kind in topics.UP_KINDS if kind != topics.PRESENCE]
    for topic in junk:
        assert not _retain(a, topic, os.urandom(JUNK)).is_failure
    peers["aggregator"].close()  # the collector's link logs in as the aggregator (one session per account)

    c = broker.creds("aggregator")
    link = MqttLink("aggregator", f"mqtts://127.0.0.1:{broker.mosq.port}", username=c.username, password=c.password,
                    ca_file=c.ca_file)
    col = Collector(enrolled={A}, keys=None, pubkeys={}, chunk_bytes=256 * 1024, out_dir=broker.files.out_dir)
    col.link = link
    link.connect()
    try:
        link.subscribe(topics.up_filter())
        deadline = time.monotonic() + TIMEOUT
        while col.cleared_retained < len(junk) and time.monotonic() < deadline:
            col.pump(time.monotonic() + 0.2)
        assert col.cleared_retained == len(junk)
        col.pump(time.monotonic() + 0.3)  # our clears come back as empty live messages: ignored
        assert col.cleared_retained == len(junk)
    finally:
        link.close()

    fresh = Peer.login(broker, "aggregator")  # a NEW subscription: only the status is still retained
    try:
        assert fresh.subscribe(topics.up_filter())[0].value < 0x80
        # The device's own status survives, and nothing else is retained.
        assert _delivered_before(fresh, a, topics.up(A, "update")) == [(status_topic, status)]
    finally:
        fresh.close()
