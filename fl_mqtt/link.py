"""A small, blocking-friendly wrapper around a paho-mqtt v2 client.

Network callbacks only enqueue; decoding, decryption and training happen on the caller's thread.
Connect failures raise. Publishes are QoS 1 and wait for the PUBACK, across a broker outage. MQTT 5 is tried first and
3.1.1 used when the broker refuses it (the embedded amqtt broker speaks 3.1.1 only), so the
protocol relies on nothing v5-specific.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from shared.wire import publish_packet_size

log = logging.getLogger(__name__)


class LinkError(ConnectionError):
    """Could not connect, or the connection was lost at a point where we cannot go on."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @staticmethod
    def parse(url: str) -> BrokerAddress:
        u = urlparse(url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError(f"broker url {url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
        tls = u.scheme == "mqtts"
        return BrokerAddress(u.hostname, u.port or (8883 if tls else 1883), tls)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class WireCounter:
    """PUBLISH bytes in each direction, per topic (see ``shared.wire``)."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, table: dict[str, int], topic: str, n: int) -> None:
        with self.lock:
            table[topic] = table.get(topic, 0) + n


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    wire_bytes: int
    retain: bool = False


def _sender(topic: str) -> str:
    """The device an upload topic belongs to (``flm/v1/up/DEV/...``), else the topic's first levels."""
    parts = topic.split("/")
    return parts[3] if len(parts) > 3 and parts[2] == "up" else "/".join(parts[:3])


class BoundedInbox:
    """The callback-to-handler queue, bounded in messages and bytes overall and in bytes per sender.

    A sender (the device an upload topic names) that floods faster than the handler drains only
    loses its own excess messages; everyone else's still fit. Dropped messages are counted and
    logged at most once a second.
    """

    def __init__(self, max_messages: int = 10_000, max_bytes: int = 512 << 20, max_bytes_per_sender: int = 32 << 20) -> None:
        self.max_messages, self.max_bytes, self.max_per_sender = max_messages, max_bytes, max_bytes_per_sender
        self._q: queue.Queue[Incoming] = queue.Queue()
        self._lock = threading.Lock()
        self._bytes = 0
        self._per: dict[str, int] = {}
        self.dropped = 0
        self._last_warn = 0.0

    def put(self, inc: Incoming) -> bool:
        n, who = len(inc.payload), _sender(inc.topic)
        with self._lock:
            if (self._q.qsize() >= self.max_messages or self._bytes + n > self.max_bytes
                    or self._per.get(who, 0) + n > self.max_per_sender):
                self.dropped += 1
                now = time.monotonic()
                if now - self._last_warn > 1.0:
                    self._last_warn = now
                    log.warning("inbox full for %s (%d bytes queued from it, %d messages overall): dropped a message "
                                "on %s (%d dropped so far)", who, self._per.get(who, 0), self._q.qsize(), inc.topic, self.dropped)
                return False
            self._bytes += n
            self._per[who] = self._per.get(who, 0) + n
        self._q.put(inc)
        return True

    def get(self, timeout: float | None = None) -> Incoming:
        inc = self._q.get(timeout=timeout)
        with self._lock:
            who = _sender(inc.topic)
            self._bytes -= len(inc.payload)
            left = self._per.get(who, 0) - len(inc.payload)
            if left > 0:
                self._per[who] = left
            else:
                self._per.pop(who, None)
        return inc

    def qsize(self) -> int:
        return self._q.qsize()


class MqttLink:
    def __init__(
        self,
        client_id: str,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        protocol: str = "auto",
        will: tuple[str, bytes] | None = None,
        keepalive: int = 30,
        allow_plaintext_password: bool = False,
        session_expiry_s: int = 3600,
    ) -> None:
        if protocol not in ("auto", "5", "3.1.1"):
            raise ValueError(f"protocol must be auto, 5 or 3.1.1, got {protocol!r}")
        self.client_id = client_id
        self.addr = BrokerAddress.parse(url)
        if password and not self.addr.tls and not _is_loopback(self.addr.host):
            if not allow_plaintext_password:
                raise LinkError(f"{client_id}: refusing to send a broker password in clear to {self.addr.host} "
                                f"(mqtt://); use mqtts://, or set allow_plaintext_password = true if you must")
            log.warning("%s: SENDING THE BROKER PASSWORD IN CLEAR to %s (allow_plaintext_password = true)",
                        client_id, self.addr.host)
        self.username, self.password, self.ca_file = username, password, ca_file
        self.protocol = protocol
        self.will = will
        self.keepalive = keepalive
        self.session_expiry_s = session_expiry_s
        # Reconnect backoff with jitter: a fleet that lost the broker at the same moment does not
        # come back in lock-step (1 s doubling to 10 s, each client's scaled by 0.5-1.5).
        j = random.uniform(0.5, 1.5)
        self.reconnect_delay = (1.0 * j, 10.0 * j)
        self.inbox = BoundedInbox()
        self.counter = WireCounter()
        self.mqtt5 = False
        self._client: Any = None
        self._connected = threading.Event()
        self._connect_failed = threading.Event()  # refused, or dropped before CONNACK
        self._connect_rc: Any = None
        self._subs: list[tuple[str, int]] = []
        self._ever_connected = False
        self.last_disconnect = 0.0  # monotonic time the link last went down (0: never)
        self.last_reconnect = 0.0  # monotonic time the link last came back after an outage (0: never)
        # Published (retained, QoS 1) on every reconnect: after an outage the broker may hold our
        # last will ("offline") as the retained status though we are back.
        self.birth: tuple[str, bytes] | None = None

    # -- callbacks: enqueue only --------------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self._connect_rc = rc
        if rc.is_failure:
            self._connect_failed.set()
        else:
            for filt, qos in self._subs:  # re-subscribe after a reconnect
                client.subscribe(filt, qos=qos)
            if self._ever_connected:
                self.last_reconnect = time.monotonic()
                log.info("%s: reconnected to the broker", self.client_id)
                if self.birth is not None:
                    client.publish(self.birth[0], self.birth[1], qos=1, retain=True)  # queued; never wait on paho's thread
            self._ever_connected = True
            self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.last_disconnect = time.monotonic()
        if not self._connected.is_set():
            self._connect_failed.set()
        self._connected.clear()
        if rc is not None and getattr(rc, "is_failure", False):
            log.warning("%s: disconnected from broker: %s", self.client_id, rc)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        n = publish_packet_size(msg.topic, len(msg.payload), msg.qos, self.mqtt5)
        self.counter.add(self.counter.received, msg.topic, n)
        self.inbox.put(Incoming(msg.topic, bytes(msg.payload), n, bool(getattr(msg, "retain", False))))

    # -- API ----------------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> None:
        """Connect or raise ``LinkError``; tries MQTT 5 then 3.1.1 under ``protocol='auto'``."""
        versions = {"auto": ["5", "3.1.1"], "5": ["5"], "3.1.1": ["3.1.1"]}[self.protocol]
        errors = []
        for v in versions:
            try:
                self._connect_once(v, timeout)
                log.info("%s: connected to %s:%d (MQTT %s%s)", self.client_id, self.addr.host, self.addr.port, v, ", TLS" if self.addr.tls else "")
                return
            except LinkError as e:
                errors.append(f"MQTT {v}: {e}")
        raise LinkError(f"{self.client_id}: cannot connect to {self.addr.host}:{self.addr.port}: " + "; ".join(errors))

    def _connect_once(self, version: str, timeout: float) -> None:
        import paho.mqtt.client as mqtt

        self.close()
        self._ever_connected = False
        self.mqtt5 = version == "5"
        proto = mqtt.MQTTv5 if self.mqtt5 else mqtt.MQTTv311
        kwargs: dict[str, Any] = {"callback_api_version": mqtt.CallbackAPIVersion.VERSION2, "client_id": self.client_id, "protocol": proto}
        if not self.mqtt5:
            kwargs["clean_session"] = True
        c = mqtt.Client(**kwargs)
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._on_message
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        if self.addr.tls:
            c.tls_set(ca_certs=self.ca_file)
        if self.will is not None:
            c.will_set(self.will[0], self.will[1], qos=1, retain=True)
        c.max_inflight_messages_set(20)
        # Reconnect soon after an outage, backing off to 10 s while the broker stays away.
        c.reconnect_delay_set(min_delay=self.reconnect_delay[0], max_delay=self.reconnect_delay[1])  # type: ignore[arg-type]
        self._connect_rc = None
        self._connected.clear()
        self._connect_failed.clear()
        extra: dict[str, Any] = {}
        if self.mqtt5 and self.session_expiry_s > 0:
            # A persistent session (MQTT 5): while the link is down the broker keeps our
            # subscriptions and queues QoS 1 messages for us, across its own restart too.
            # clean_start is false from the first connect: Mosquitto 2.0 does not write a session
            # begun with clean_start to its persistence file (seen with 2.0.11), and what a
            # previous run of this process left queued is refused by round and sequence number
            # like any replay (a restarted device also gets the round it missed). MQTT 3.1.1 (the
            # embedded one-machine broker) stays clean-session.
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            extra["properties"] = props
            extra["clean_start"] = False
        try:
            c.connect(self.addr.host, self.addr.port, keepalive=self.keepalive, **extra)
        except OSError as e:
            raise LinkError(str(e)) from e
        c.loop_start()
        self._client = c
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._connected.is_set():
            if self._connect_failed.is_set():
                break
            time.sleep(0.02)
        if not self._connected.is_set():
            rc = self._connect_rc
            self.close()
            raise LinkError(f"refused: {rc}" if rc is not None else f"no CONNACK within {timeout}s")

    def subscribe(self, filt: str, qos: int = 1) -> None:
        self._subs.append((filt, qos))
        rc, _mid = self._require().subscribe(filt, qos=qos)
        if rc != 0:
            raise LinkError(f"subscribe {filt} failed: rc={rc}")

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 60.0) -> int:
        """QoS 1 publish that waits for the PUBACK; returns the PUBLISH packet's size in bytes.

        A broker outage is not an error until ``timeout``: paho's network thread reconnects (with
        backoff), and a publish made while disconnected, or cut off before its PUBACK, is sent
        again once the link is back. A resend may deliver twice; receivers drop the repeat by its
        (device, round, seq). Only a link still down at ``timeout`` raises ``LinkError``.
        """
        import paho.mqtt.client as mqtt

        client = self._require()
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            left = deadline - time.monotonic()
            if not self._connected.is_set():
                if not waited:
                    log.warning("%s: broker connection lost; holding a publish to %s until it is back (up to %.0fs)",
                                self.client_id, topic, max(0.0, left))
                    waited = True
                if left <= 0 or not self._connected.wait(timeout=left):
                    raise LinkError(f"publish to {topic}: not connected to the broker within {timeout:.0f}s")
                continue
            info = client.publish(topic, payload, qos=1, retain=retain)
            if info.rc == mqtt.MQTT_ERR_NO_CONN:
                self._connected.clear()  # the callback may not have run yet
                continue
            try:
                info.wait_for_publish(timeout=max(0.01, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as e:
                if not self._connected.is_set() and time.monotonic() < deadline:
                    continue  # lost before the PUBACK: send again once reconnected
                raise LinkError(f"publish to {topic} failed: {e}") from e
            if info.is_published():
                break
            if self._connected.is_set() or time.monotonic() >= deadline:
                raise LinkError(f"publish to {topic}: no PUBACK within {timeout}s")
        if waited:
            log.info("%s: broker connection back; publish to %s went through", self.client_id, topic)
        n = publish_packet_size(topic, len(payload), 1, self.mqtt5)
        self.counter.add(self.counter.sent, topic, n)
        return n

    @property
    def connected(self) -> bool:
        """Whether the broker session is up now (an operator's health check reads it)."""
        return self._client is not None and self._connected.is_set()

    def get(self, timeout: float | None = None) -> Incoming | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            try:
                c.disconnect()
            finally:
                c.loop_stop()

    def _require(self) -> Any:
        if self._client is None:
            raise LinkError("not connected")
        return self._client
