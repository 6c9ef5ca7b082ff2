"""Device certificates from a fleet authority that is not the aggregator.

Secure aggregation against an aggregator that deviates needs what Bonawitz et al. assume: every
device can check that a peer's key advert really comes from that peer. The aggregator relays the
adverts, so its own runtime key cannot vouch for them. An operator's offline authority key signs,
at enrollment, the binding (device id -> the device's long-term public keys); devices pin the
authority's public key, and every advert carries its sender's certificate and a signature made
with the certified key. A substituted key or an invented participant then fails to verify.

Certificates are JSON files (``format: "flm-device-cert"``) holding one signed blob
(``shared.crypto.sign`` under the authority's key, bound to the device id and the kind
``device_cert``); what is signed is the device id and both public keys, so nothing outside the
signature is trusted.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from shared import crypto
from shared.crypto import CryptoError
from shared.errors import SchemaError
from shared.topics import check_device_id

FORMAT = "flm-device-cert"
VERSION = 1
KIND = "device_cert"


@dataclass(frozen=True)
class Certificate:
    """The authority's signature on (device id, the device's long-term public keys)."""

    device_id: str
    keys: crypto.PublicKeys
    blob: bytes  # crypto.sign(payload, authority, aad=(0, device_id, "device_cert"))

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
        return Certificate(device_id, _parse(payload, device_id), bytes(blob))


def _payload(device_id: str, keys: crypto.PublicKeys) -> bytes:
    return json.dumps({"device_id": device_id, "signing": base64.b64encode(keys.signing).decode(),
                       "encryption": base64.b64encode(keys.encryption).decode()}, sort_keys=True).encode()


def _parse(payload: bytes, device_id: str) -> crypto.PublicKeys:
    try:
        obj = json.loads(payload)
        if obj["device_id"] != device_id:
            raise SchemaError(f"certificate is for {obj['device_id']!r}, not {device_id!r}")
        return crypto.PublicKeys(signing=base64.b64decode(obj["signing"], validate=True),
                                 encryption=base64.b64decode(obj["encryption"], validate=True))
    except (ValueError, KeyError, TypeError) as e:
        raise SchemaError(f"certificate payload: {e}") from None


def _unverified_payload(blob: bytes) -> bytes:
    return crypto.signed_payload(blob)


def certify(device_id: str, keys: crypto.PublicKeys, authority: crypto.DeviceKeys) -> Certificate:
    """Sign a device's long-term keys with the authority's key (run where the authority key lives)."""
    check_device_id(device_id)
    blob = crypto.sign(_payload(device_id, keys), authority, aad=crypto.AssociatedData(0, device_id, KIND))
    return Certificate(device_id, keys, blob)


def verify(cert: Certificate, authority: crypto.PublicKeys, device_id: str) -> crypto.PublicKeys:
    """The device's keys if ``cert`` is the authority's signature for ``device_id``, else CryptoError."""
    if cert.device_id != device_id:
        raise CryptoError(f"certificate names {cert.device_id!r}, not {device_id!r}")
    payload = crypto.verify(cert.blob, authority, aad=crypto.AssociatedData(0, device_id, KIND))
    keys = _parse(payload, device_id)
    if keys != cert.keys:
        raise CryptoError(f"certificate of {device_id} carries keys other than the ones it signs")
    return keys


def load(path: str | Path) -> Certificate:
    try:
        return Certificate.from_json(Path(path).read_text())
    except OSError as e:
        raise SchemaError(f"cannot read device certificate {path}: {e}") from None
