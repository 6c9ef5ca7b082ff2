"""A broker outage is not a device's death (issue 11): publishes wait for paho's reconnect.

Seen before: Mosquitto stopped for 5 s mid-round, and every device that published meanwhile got
"The client is not currently connected" and exited with code 2.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fl_mqtt.link import LinkError, MqttLink
from tests.brokers import start_mosquitto


def test_a_publish_during_a_broker_outage_goes_through_after_the_restart(tmp_path: Path) -> None:
    mosq = start_mosquitto(tmp_path / "b1")
    sender, receiver = MqttLink("sender", mosq.url), MqttLink("receiver", mosq.url)
    sender.connect()
    receiver.connect()
    receiver.subscribe("t/#")
    try:
        mosq.proc.kill()  # as with kill -9: no clean shutdown
        mosq.proc.wait()
        time.sleep(0.3)
        restarted: list = []
        threading.Timer(2.0, lambda: restarted.append(start_mosquitto(tmp_path / "b2", port=mosq.port))).start()
        t0 = time.monotonic()
        n = sender.publish("t/during-outage", b"x" * 100, timeout=30)  # used to raise at once
        assert n > 100 and 1.5 < time.monotonic() - t0 < 30
        # The receiver reconnected and re-subscribed on its own: a later message reaches it.
        deadline = time.monotonic() + 20
        got = None
        while got is None and time.monotonic() < deadline:
            sender.publish("t/after", b"hello", timeout=10)
            got = receiver.get(timeout=0.5)
            while got is not None and got.topic != "t/after":
                got = receiver.get(timeout=0.5)
        assert got is not None and got.payload == b"hello"
    finally:
        sender.close()
        receiver.close()
        for m in [mosq, *locals().get("restarted", [])]:
            m.stop()


def test_a_publish_while_the_broker_stays_away_fails_with_a_link_error(tmp_path: Path) -> None:
    mosq = start_mosquitto(tmp_path / "b")
    link = MqttLink("lonely", mosq.url)
    link.connect()
    try:
        mosq.stop()
        time.sleep(0.3)
        t0 = time.monotonic()
        with pytest.raises(LinkError, match="not connected"):
            link.publish("t/x", b"x", timeout=1.5)
        assert time.monotonic() - t0 < 5
    finally:
        link.close()
