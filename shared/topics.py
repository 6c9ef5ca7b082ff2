"""MQTT topic names, built and parsed in one place under a versioned prefix.

Layout (``{d}`` is a device id):

- ``flm/v1/bcast/{kind}``   aggregator -> every device (round announcements, releases)
- ``flm/v1/down/{d}/{kind}`` aggregator -> one device
- ``flm/v1/up/{d}/{kind}``   one device -> aggregator (status, updates, chunks)

Broker ACLs follow the same shape: a device may write only its own ``up/{its id}/{kind}`` for
the kinds in ``UP_KINDS``, read only ``down/{its id}/`` and ``bcast/``; the aggregator reads
``up/#`` and writes ``down/#`` and ``bcast/#`` (and, to clear retained junk, the non-presence
upload kinds). Device ids are one topic level, so they may not contain ``/``, ``+`` or ``#``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import SchemaError

PREFIX = "flm/v1"
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
KIND_RE = re.compile(r"^[a-z0-9_]{1,32}$")

# Directions, as the second topic level after the prefix.
UP = "up"
DOWN = "down"
BCAST = "bcast"

# What a device publishes under ``up/{d}/``: its presence (the only retained message, with its
# last will), updates, chunks of large uploads, secure-aggregation stage messages.
PRESENCE = "status"
UP_KINDS = (PRESENCE, "update", "chunk", "secagg")


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is a valid single topic level, else raise ``ValueError``."""
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise ValueError(
            f"invalid device id {device_id!r}: use 1-64 characters from A-Z a-z 0-9 _ -"
        )
    return device_id


def _check_kind(kind: str) -> str:
    if not KIND_RE.match(kind):
        raise ValueError(f"invalid topic kind {kind!r}")
    return kind


def up(device_id: str, kind: str) -> str:
    return f"{PREFIX}/{UP}/{check_device_id(device_id)}/{_check_kind(kind)}"


def down(device_id: str, kind: str) -> str:
    return f"{PREFIX}/{DOWN}/{check_device_id(device_id)}/{_check_kind(kind)}"


def bcast(kind: str) -> str:
    return f"{PREFIX}/{BCAST}/{_check_kind(kind)}"


def up_filter(device_id: str = "+") -> str:
    """Subscription filter for uploads: one device's, or every device's with ``+``."""
    dev = device_id if device_id == "+" else check_device_id(device_id)
    return f"{PREFIX}/{UP}/{dev}/#"


def down_filter(device_id: str) -> str:
    return f"{PREFIX}/{DOWN}/{check_device_id(device_id)}/#"


def bcast_filter() -> str:
    return f"{PREFIX}/{BCAST}/#"


def up_device(topic: str) -> str | None:
    """The device level of a topic under ``{PREFIX}/up/``, if it is a valid device id (the rest of
    the topic may be malformed); None otherwise. For naming who left something on a topic."""
    if not is_up(topic):
        return None
    dev = topic[len(PREFIX) + len(UP) + 2 :].split("/", 1)[0]
    return dev if DEVICE_ID_RE.match(dev) else None


def is_up(topic: str) -> bool:
    """Whether ``topic`` lies under the upload prefix (well-formed or not)."""
    return topic.startswith(f"{PREFIX}/{UP}/")


@dataclass(frozen=True)
class Topic:
    direction: str  # UP, DOWN or BCAST
    device_id: str | None  # None for broadcasts
    kind: str


def parse(topic: str) -> Topic:
    """Parse a topic of ours; raise ``SchemaError`` for anything else."""
    if not topic.startswith(PREFIX + "/"):
        raise SchemaError(f"topic {topic!r} is not under {PREFIX}/")
    parts = topic[len(PREFIX) + 1 :].split("/")
    if len(parts) == 2 and parts[0] == BCAST and KIND_RE.match(parts[1]):
        return Topic(BCAST, None, parts[1])
    if (
        len(parts) == 3
        and parts[0] in (UP, DOWN)
        and DEVICE_ID_RE.match(parts[1])
        and KIND_RE.match(parts[2])
    ):
        return Topic(parts[0], parts[1], parts[2])
    raise SchemaError(f"topic {topic!r} does not match {PREFIX}/(up|down)/DEVICE/KIND or bcast/KIND")
