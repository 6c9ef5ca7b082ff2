"""Enrolled devices: device id -> public keys (and the fleet authority's certificate of them), in
one JSON file the aggregator owns.

Only enrolled devices take part; anything else on the broker is ignored with a log line. A device
enrolled with a certificate can take part in hardened secure aggregation: its key adverts carry
that certificate, which the aggregator checks byte for byte against the enrolled one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from shared import authority
from shared.crypto import CryptoError, PublicKeys
from shared.errors import ConfigError, SchemaError
from shared.topics import check_device_id


@dataclass(frozen=True)
class Enrolled:
    keys: PublicKeys
    cert: authority.Certificate | None = None


def load_entries(path: str | Path) -> dict[str, Enrolled]:
    p = Path(path)
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text())
        out = {}
        for d, entry in data["devices"].items():
            check_device_id(d)
            if "keys" in entry:  # {"keys": ..., "cert": ...}
                cert = authority.Certificate.from_json(json.dumps(entry["cert"])) if entry.get("cert") else None
                out[d] = Enrolled(PublicKeys.from_json(json.dumps(entry["keys"])), cert)
            else:  # a bare public key file's contents (registries written before certificates)
                out[d] = Enrolled(PublicKeys.from_json(json.dumps(entry)))
        return out
    except (ValueError, KeyError, TypeError, SchemaError) as e:
        raise ConfigError(f"device registry {p} is invalid: {e}") from e


def load(path: str | Path) -> dict[str, PublicKeys]:
    return {d: e.keys for d, e in load_entries(path).items()}


def certificates(path: str | Path) -> dict[str, bytes]:
    """Device id -> its certificate blob, for the devices enrolled with one."""
    return {d: e.cert.blob for d, e in load_entries(path).items() if e.cert is not None}


def enroll(path: str | Path, device_id: str, public: PublicKeys, *, replace: bool = False,
           cert: authority.Certificate | None = None, authority_keys: PublicKeys | None = None) -> None:
    """Add one device (or, with ``replace``, give an enrolled one a new key); written atomically
    so a crash never leaves half a registry. Re-enrolling the same key is a no-op. A certificate
    must be the authority's (when its key is given) and certify exactly these keys."""
    check_device_id(device_id)
    if cert is not None:
        if cert.device_id != device_id or cert.keys != public:
            raise ConfigError(f"the certificate is for {cert.device_id} and other keys, not {device_id}'s")
        if authority_keys is not None:
            try:
                authority.verify(cert, authority_keys, device_id)
            except CryptoError as e:
                raise ConfigError(f"the certificate of {device_id} is not the fleet authority's: {e}") from e
    p = Path(path)
    devices = load_entries(p)
    old = devices.get(device_id)
    if old is not None and old.keys.to_json() != public.to_json() and not replace:
        raise ConfigError(f"{device_id} is already enrolled in {p} with key {old.keys.fingerprint()}; pass --replace to "
                          f"give it the key {public.fingerprint()}")
    devices[device_id] = Enrolled(public, cert if cert is not None else (old.cert if old and old.keys == public else None))
    _write(p, devices)


def unenroll(path: str | Path, device_id: str) -> Enrolled:
    """Remove one device (it is ignored from the aggregator's next start); returns its entry."""
    p = Path(path)
    devices = load_entries(p)
    if device_id not in devices:
        raise ConfigError(f"{device_id} is not enrolled in {p} (enrolled: {', '.join(sorted(devices)) or 'none'})")
    gone = devices.pop(device_id)
    _write(p, devices)
    return gone


def _write(p: Path, devices: dict[str, Enrolled]) -> None:
    out = {"devices": {d: {"keys": json.loads(e.keys.to_json()), "cert": json.loads(e.cert.to_json()) if e.cert else None}
                       for d, e in sorted(devices.items())}}
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, p)  # atomic: a crash never leaves half a registry
