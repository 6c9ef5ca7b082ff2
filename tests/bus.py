"""An in-memory stand-in for the broker, for tests that need deterministic, single-threaded rounds.

``FakeLink`` has the part of ``fl_mqtt.link.MqttLink`` the aggregator and edge clients use
(subscribe, publish, get, close). The aggregator's link runs the devices whenever it would wait,
so one thread plays the whole fleet. ``DropPlan`` kills devices right before they would send a
given secure-aggregation stage's message, and publishes their offline status as a broker's last
will would. Real networking is covered by the Mosquitto tests; this is about the round logic.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from fl_mqtt.link import Incoming
from shared import topics


def matches(filt: str, topic: str) -> bool:
    f, t = filt.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)


class Bus:
    def __init__(self) -> None:
        self.links: list[FakeLink] = []
        self.retained: dict[str, bytes] = {}

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        n = len(topic) + len(payload) + 4  # MQTT PUBLISH header, topic length, packet id: close enough
        if retain:
            self.retained[topic] = payload
        for link in self.links:
            if any(matches(f, topic) for f in link.filters):
                link.inbox.append(Incoming(topic, payload, n))
        return n


class FakeLink:
    def __init__(self, bus: Bus, name: str, pump: Callable[[], Any] | None = None,
                 outgoing: Callable[[str, bytes], bool] | None = None) -> None:
        self.bus, self.name, self.pump, self.outgoing = bus, name, pump, outgoing
        self.filters: list[str] = []
        self.inbox: deque[Incoming] = deque()
        bus.links.append(self)

    def subscribe(self, filt: str, qos: int = 1) -> None:
        self.filters.append(filt)
        for topic, payload in self.bus.retained.items():
            if matches(filt, topic):
                self.inbox.append(Incoming(topic, payload, len(topic) + len(payload) + 4))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 60.0) -> int:
        if self.outgoing is not None and not self.outgoing(topic, payload):
            return len(topic) + len(payload) + 4  # the sender believes it sent; nobody receives it
        return self.bus.publish(topic, payload, retain)

    def get(self, timeout: float | None = None) -> Incoming | None:
        if not self.inbox and self.pump is not None:
            self.pump()
        if self.inbox:
            return self.inbox.popleft()
        time.sleep(0.002)
        return None

    def close(self) -> None:
        pass


class DropPlan:
    """Which device dies before which stage in the current round: advertise, reveal, share,
    receipt, masked, consistency, unmask."""

    # The device's secagg uploads in order (the hardened round); "masked" is the update.
    ORDER = ("advertise", "reveal", "share", "receipt", "consistency", "unmask")

    def __init__(self) -> None:
        self.drops: dict[str, str] = {}
        self.dead: set[str] = set()
        self.sent: dict[str, int] = {}
        self.edges: dict[str, Any] = {}
        self.replay: set[str] = set()  # devices whose every stage message is followed by their previous one
        self.last: dict[str, tuple[str, bytes]] = {}

    def start_round(self, drops: dict[str, str], edges: list[Any], replay: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.edges = {e.cfg.device_id: e for e in edges}
        revived = self.dead
        self.drops, self.dead, self.sent, self.replay, self.last = dict(drops), set(), {}, set(replay), {}
        for dev in sorted(revived):
            self.edges[dev].link.inbox.clear()
            self.edges[dev].publish_status("online")

    def filter(self, dev: str) -> Callable[[str, bytes], bool]:
        def allow(topic: str, payload: bytes) -> bool:
            if dev in self.dead:
                return False
            kind = topics.parse(topic).kind
            if kind == "secagg":
                i = self.sent.get(dev, 0)
                self.sent[dev] = i + 1
                stage = self.ORDER[i] if i < len(self.ORDER) else "?"
            elif kind in ("update", "chunk"):
                stage = "masked"
            else:
                return True
            if self.drops.get(dev) == stage:
                self.dead.add(dev)
                # What the broker would publish for a dead client: its (signed) last will.
                self.edges[dev].link.bus.publish(topics.up(dev, "status"), self.edges[dev]._status("offline", "killed"), retain=True)
                return False
            if dev in self.replay:
                # An attacker on the broker replaying the device's previous message after this one.
                bus, previous = self.edges[dev].link.bus, self.last.get(dev)
                self.last[dev] = (topic, payload)
                if previous is not None:
                    bus.publish(topic, payload)
                    bus.publish(*previous)
                    return False
            return True

        return allow

    def step(self, edge: Any) -> None:
        """Let one device handle everything queued for it (a dead one hears nothing)."""
        dev = edge.cfg.device_id
        while edge.link.inbox:
            inc = edge.link.inbox.popleft()
            if dev not in self.dead:
                edge.handle(inc.topic, inc.payload)
