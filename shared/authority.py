"""Device certificates from a fleet authority that is not the aggregator.

Secure aggregation against an aggregator that deviates needs what Bonawitz et al. assume: every
device can check that a peer's key advert really comes from that peer. The aggregator relays the
adverts, so its own runtime key cannot vouch for them. An operator's offline authority key signs,
at enrollment, the binding (device id -> the device's long-term public keys); devices pin the
authority's public key, and every advert carries its sender's certificate and a signature made
with the certified key. A substituted key or an invented participant then fails to verify.

Certificates are JSON files (``format: "flm-device-cert"``) holding one signed blob
(``shared.crypto.sign`` under the authority's key, bound to the device id and the kind
``device_cert``); what is signed is the device id, both public keys and the validity window
(``not_before`` / ``not_after``, Unix seconds), so nothing outside the signature is trusted. A
certificate signed before windows existed has none and never expires: re-certify to give it one.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path

from shared import crypto
from shared.canonical import canonical_json_cert_v1
from shared.crypto import CryptoError
from shared.errors import SchemaError
from shared.topics import check_device_id

FORMAT = "flm-device-cert"
VERSION = 1
KIND = "device_cert"
DEFAULT_DAYS = 730
# Backdated so that a device whose clock runs up to this far behind the authority's can use a
# certificate the moment it gets it (a Jetson without an RTC battery boots in 1970 until NTP).
BACKDATE_S = 3600.0


@dataclass(frozen=True)
class Certificate:
    """The authority's signature on (device id, the device's long-term public keys)."""

    device_id: str
    keys: crypto.PublicKeys
    blob: bytes  # crypto.sign(payload, authority, aad=(0, device_id, "device_cert"))
    not_before: float | None = None  # Unix seconds; None: a certificate from before windows existed
    not_after: float | None = None

    def window_problem(self, now: float | None = None) -> str | None:
        """Why the certificate is not valid at ``now`` (default: this machine's clock), or None."""
        t = time.time() if now is None else now
        if self.not_before is not None and t < self.not_before:
            return f"not valid until {iso_time(self.not_before)} (this clock says {iso_time(t)})"
        if self.not_after is not None and t > self.not_after:
            return f"expired at {iso_time(self.not_after)} (this clock says {iso_time(t)})"
        return None

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "device_id": self.device_id,
                           "signed": base64.b64encode(self.blob).decode()}, indent=2) + "\n"

    @staticmethod
    def from_json(text: str | bytes) -> Certificate:
        """Parse (not verify: see ``verify``) a certificate file's contents."""
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise SchemaError(f"device certificate is not JSON: {e}") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT or set(obj) != {"format", "version", "device_id", "signed"}:
            raise SchemaError(f"not a {FORMAT} file")
        if obj["version"] != VERSION:
            raise SchemaError(f"device certificate version {obj['version']!r} is not {VERSION}")
        try:
            blob = base64.b64decode(obj["signed"], validate=True)
        except (ValueError, TypeError) as e:
            raise SchemaError(f"device certificate: bad base64: {e}") from None
        return Certificate.from_blob(str(obj["device_id"]), blob)

    @staticmethod
    def from_blob(device_id: str, blob: bytes) -> Certificate:
        """The certificate as it travels inside a key advert (its keys are read, not yet trusted)."""
        check_device_id(device_id)
        payload = _unverified_payload(blob)
        keys, window = _parse(payload, device_id)
        return Certificate(device_id, keys, bytes(blob), *window)


def iso_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _payload(device_id: str, keys: crypto.PublicKeys, not_before: float, not_after: float) -> bytes:
    # Format version 1's own spacing, kept byte-identical: see shared.canonical.
    return canonical_json_cert_v1({"device_id": device_id, "signing": base64.b64encode(keys.signing).decode(),
                                   "encryption": base64.b64encode(keys.encryption).decode(),
                                   "not_before": int(not_before), "not_after": int(not_after)})


def _parse(payload: bytes, device_id: str) -> tuple[crypto.PublicKeys, tuple[float | None, float | None]]:
    try:
        obj = json.loads(payload)
        if obj["device_id"] != device_id:
            raise SchemaError(f"certificate is for {obj['device_id']!r}, not {device_id!r}")
        keys = crypto.PublicKeys(signing=base64.b64decode(obj["signing"], validate=True),
                                 encryption=base64.b64decode(obj["encryption"], validate=True))
        window = (obj.get("not_before"), obj.get("not_after"))
        if any(w is not None and (isinstance(w, bool) or not isinstance(w, int)) for w in window):
            raise SchemaError(f"certificate window {window} is not whole Unix seconds")
        return keys, (None if window[0] is None else float(window[0]), None if window[1] is None else float(window[1]))
    except (ValueError, KeyError, TypeError) as e:
        raise SchemaError(f"certificate payload: {e}") from None


def _unverified_payload(blob: bytes) -> bytes:
    return crypto.signed_payload(blob)


def certify(device_id: str, keys: crypto.PublicKeys, authority: crypto.DeviceKeys, *, days: float = DEFAULT_DAYS,
            not_before: float | None = None) -> Certificate:
    """Sign a device's long-term keys with the authority's key (run where the authority key lives),
    valid from ``not_before`` (default: now less ``BACKDATE_S``) for ``days``."""
    check_device_id(device_id)
    if not days > 0:
        raise ValueError(f"certificate validity of {days} days: must be positive")
    start = int(time.time() - BACKDATE_S if not_before is None else not_before)
    end = int(start + days * 86400)
    blob = crypto.sign(_payload(device_id, keys, start, end), authority, aad=crypto.AssociatedData(0, device_id, KIND))
    return Certificate(device_id, keys, blob, float(start), float(end))


def verify(cert: Certificate, authority: crypto.PublicKeys, device_id: str, now: float | None = None) -> crypto.PublicKeys:
    """The device's keys if ``cert`` is the authority's signature for ``device_id`` and valid at
    ``now`` (default: this machine's clock), else CryptoError naming why."""
    if cert.device_id != device_id:
        raise CryptoError(f"certificate names {cert.device_id!r}, not {device_id!r}")
    payload = crypto.verify(cert.blob, authority, aad=crypto.AssociatedData(0, device_id, KIND))
    keys, window = _parse(payload, device_id)
    if keys != cert.keys or window != (cert.not_before, cert.not_after):
        raise CryptoError(f"certificate of {device_id} carries keys or a window other than the ones it signs")
    why = cert.window_problem(now)
    if why:
        raise CryptoError(f"certificate of {device_id} is {why}")
    return keys


def load(path: str | Path) -> Certificate:
    try:
        return Certificate.from_json(Path(path).read_text())
    except OSError as e:
        raise SchemaError(f"cannot read device certificate {path}: {e}") from None
