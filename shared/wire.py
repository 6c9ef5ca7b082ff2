"""Exact sizes of what goes over MQTT, for the per-device byte accounting in metrics.

We count the PUBLISH packet as the broker receives or sends it: fixed header, remaining-length
varint, topic, packet id (QoS > 0), properties (MQTT 5) and payload. TCP/TLS framing and the
PUBACK are not counted; that is stated wherever the numbers are shown.
"""

from __future__ import annotations


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_packet_size(topic: str, payload_len: int, qos: int = 1, mqtt5: bool = False, props_len: int = 0) -> int:
    variable = 2 + len(topic.encode("utf-8")) + (2 if qos > 0 else 0)
    if mqtt5:
        variable += _varint_len(props_len) + props_len
    remaining = variable + payload_len
    return 1 + _varint_len(remaining) + remaining
