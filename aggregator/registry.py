"""Enrolled devices: device id -> public keys, in one JSON file the aggregator owns.

Only enrolled devices take part; anything else on the broker is ignored with a log line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from shared.crypto import PublicKeys
from shared.errors import ConfigError
from shared.topics import check_device_id


def load(path: str | Path) -> dict[str, PublicKeys]:
    p = Path(path)
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text())
        return {check_device_id(d): PublicKeys.from_json(json.dumps(k)) for d, k in data["devices"].items()}
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"device registry {p} is invalid: {e}") from e


def enroll(path: str | Path, device_id: str, public: PublicKeys) -> None:
    """Add or replace one device; written atomically so a crash never leaves half a registry."""
    check_device_id(device_id)
    p = Path(path)
    devices = load(p)
    devices[device_id] = public
    out = {"devices": {d: json.loads(k.to_json()) for d, k in sorted(devices.items())}}
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, p)
