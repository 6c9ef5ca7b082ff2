"""The link's inbox is bounded per sender: a flooding device loses its own excess only."""

from __future__ import annotations

import pytest

from fl_mqtt.link import BoundedInbox, Incoming, LinkError, MqttLink
from shared import topics


def test_a_flooding_sender_cannot_crowd_out_the_others() -> None:
    box = BoundedInbox(max_messages=1000, max_bytes=10_000, max_bytes_per_sender=3_000)
    flood = [box.put(Incoming(topics.up("dev-a", "chunk"), bytes(1000), 1000)) for _ in range(10)]
    assert flood == [True] * 3 + [False] * 7 and box.dropped == 7
    assert box.put(Incoming(topics.up("dev-b", "update"), bytes(1000), 1000))
    got = [box.get(timeout=0).topic for _ in range(4)]
    assert got.count(topics.up("dev-b", "update")) == 1
    assert box.put(Incoming(topics.up("dev-a", "chunk"), bytes(1000), 1000))  # drained: room again


def test_the_inbox_is_bounded_overall() -> None:
    box = BoundedInbox(max_messages=5, max_bytes=1 << 20, max_bytes_per_sender=1 << 20)
    ok = [box.put(Incoming(topics.up(f"dev-{i}", "status"), b"x", 1)) for i in range(8)]
    assert ok == [True] * 5 + [False] * 3


def test_a_password_is_not_sent_in_clear_to_another_host() -> None:
    with pytest.raises(LinkError, match="in clear"):
        MqttLink("dev-a", "mqtt://10.1.2.3:1883", username="dev-a", password="secret")
    MqttLink("dev-a", "mqtt://127.0.0.1:1883", username="dev-a", password="secret")  # loopback: fine
    MqttLink("dev-a", "mqtts://10.1.2.3:8883", username="dev-a", password="secret")  # TLS: fine
    MqttLink("dev-a", "mqtt://10.1.2.3:1883", username="dev-a", password="secret", allow_plaintext_password=True)
