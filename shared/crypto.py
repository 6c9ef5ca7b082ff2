"""The small, safe crypto surface: device/aggregator identities, seal/open, sign/verify.

- ``seal`` encrypts one message to a recipient's X25519 key (fresh ephemeral key, HKDF-SHA256,
  AES-256-GCM) and signs the whole blob with the sender's Ed25519 key. Devices seal updates to
  the aggregator; the broker (which terminates TLS and sees every payload) learns nothing.
- ``sign`` / ``verify`` authenticate aggregator -> device messages (round announcements,
  releases), which are public but must not be forgeable.
- Both bind ``AssociatedData`` (protocol version, round, device id, message kind), so a message
  replayed into another round, to another device or as another kind fails.
- Every decrypt/verify failure raises ``CryptoError`` (a ``ProtocolError``); nothing returns False.

Cipher suite, KDF labels, nonce derivation and the byte layouts are constants in
``shared._hazmat``, the only module that imports ``cryptography.hazmat``.

``make_server_tls`` makes the broker's CA and server certificate (``aggregator.broker_config``).

Key files: private keys are a JSON file written with mode 0600 and refused on load when group or
others have any access; public keys are a small JSON file (``fl-agg enroll DEVICE PUBKEY_FILE``
reads one; each device pins the aggregator's).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import _hazmat
from shared._hazmat import CryptoError
from shared.errors import ConfigError, SchemaError
from shared.topics import DEVICE_ID_RE, KIND_RE

__all__ = [
    "PROTOCOL_VERSION",
    "BROADCAST",
    "SEAL_OVERHEAD",
    "SIGN_OVERHEAD",
    "CryptoError",
    "KeyFilePermissionError",
    "AssociatedData",
    "PublicKeys",
    "DeviceKeys",
    "AggregatorKeys",
    "generate_keys",
    "generate_device_keys",
    "save_private_keys",
    "load_private_keys",
    "parse_private_keys",
    "save_public_keys",
    "load_public_keys",
    "seal",
    "open_sealed",
    "sign",
    "verify",
    "TlsMaterial",
    "make_server_tls",
]

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
# ``AssociatedData.device_id`` for messages meant for every device (broadcast announcements).
BROADCAST = "*"
# Bytes a sealed / signed blob adds to its payload (size limits and chunking use these).
SEAL_OVERHEAD = _hazmat.SEAL_OVERHEAD
SIGN_OVERHEAD = _hazmat.SIGN_OVERHEAD

_AAD_LABEL = b"flm/aad/v1"
_PRIVATE_FORMAT = "flm-private-keys"
_PUBLIC_FORMAT = "flm-public-keys"
_KEY_FILE_VERSION = 1


class KeyFilePermissionError(ConfigError):
    """A private key file is readable (or writable) by group or others; it is refused unread."""


# --- associated data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AssociatedData:
    """What a message is bound to. Both sides build it from context, never from the message.

    ``device_id`` is the device the message is from (uploads) or for (downloads), or
    ``BROADCAST`` for messages to every device.
    """

    round: int
    device_id: str
    kind: str
    protocol_version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        for name in ("round", "protocol_version"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"AssociatedData.{name} must be an int, got {type(value).__name__}")
        if not 0 <= self.round < 2**64:
            raise ValueError(f"AssociatedData.round {self.round} is outside 0..2**64-1")
        if not 0 <= self.protocol_version < 2**16:
            raise ValueError(f"AssociatedData.protocol_version {self.protocol_version} is outside 0..65535")
        if not isinstance(self.device_id, str) or not (
            self.device_id == BROADCAST or DEVICE_ID_RE.match(self.device_id)
        ):
            raise ValueError(f"AssociatedData.device_id {self.device_id!r} is not a device id or BROADCAST")
        if not isinstance(self.kind, str) or not KIND_RE.match(self.kind):
            raise ValueError(f"AssociatedData.kind {self.kind!r} is not a message kind")

    def encode(self) -> bytes:
        """Unambiguous bytes: a label, fixed-width integers, then length-prefixed strings."""
        dev = self.device_id.encode()
        kind = self.kind.encode()
        return (
            _AAD_LABEL
            + struct.pack(">HQ", self.protocol_version, self.round)
            + struct.pack(">H", len(dev))
            + dev
            + struct.pack(">H", len(kind))
            + kind
        )


# --- keys ----------------------------------------------------------------------------------------


def _check_raw(name: str, value: Any) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != 32:
        raise ValueError(f"{name} must be 32 raw bytes")
    return bytes(value)


@dataclass(frozen=True)
class PublicKeys:
    """A party's public identity: Ed25519 (verifies its signatures), X25519 (encrypt to it)."""

    signing: bytes
    encryption: bytes

    def __post_init__(self) -> None:
        _check_raw("PublicKeys.signing", self.signing)
        _check_raw("PublicKeys.encryption", self.encryption)
        try:
            _hazmat.check_public_keys(self.signing, self.encryption)
        except ValueError as exc:
            raise ValueError(f"invalid public key: {exc}") from None

    def fingerprint(self) -> str:
        """Short hex digest of both keys, to compare out of band when enrolling or pinning."""
        return hashlib.sha256(b"flm-pk\x00" + self.signing + self.encryption).hexdigest()[:32]

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _PUBLIC_FORMAT,
                "version": _KEY_FILE_VERSION,
                "signing_ed25519": base64.b64encode(self.signing).decode(),
                "encryption_x25519": base64.b64encode(self.encryption).decode(),
            },
            indent=2,
        ) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> PublicKeys:
        obj = _parse_key_json(text, _PUBLIC_FORMAT)
        try:
            return cls(
                signing=_b64key(obj, "signing_ed25519"), encryption=_b64key(obj, "encryption_x25519")
            )
        except ValueError as exc:
            raise SchemaError(f"public key file: {exc}") from None


@dataclass(frozen=True, eq=False)
class DeviceKeys:
    """A party's private keys (a device's, or the aggregator's: see ``AggregatorKeys``).

    Raw 32-byte secrets, hidden from ``repr`` and not compared with ``==`` (which would not be
    constant-time). ``public`` is what others enroll or pin.
    """

    signing_seed: bytes = field(repr=False)
    encryption_secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_raw("DeviceKeys.signing_seed", self.signing_seed)
        _check_raw("DeviceKeys.encryption_secret", self.encryption_secret)

    @property
    def public(self) -> PublicKeys:
        return PublicKeys(
            signing=_hazmat.signing_public(self.signing_seed),
            encryption=_hazmat.x25519_public(self.encryption_secret),
        )

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        return save_private_keys(self, path, overwrite=overwrite)


# The aggregator's identity has the same shape; the alias documents intent at call sites.
AggregatorKeys = DeviceKeys


def generate_keys() -> DeviceKeys:
    """Fresh Ed25519 + X25519 keys from the OS CSPRNG."""
    return DeviceKeys(signing_seed=_hazmat.new_signing_seed(), encryption_secret=_hazmat.new_x25519_secret())


generate_device_keys = generate_keys


# --- key files -----------------------------------------------------------------------------------


def _b64key(obj: dict[str, Any], name: str) -> bytes:
    value = obj.get(name)
    if not isinstance(value, str):
        raise SchemaError(f"key file field {name!r} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SchemaError(f"key file field {name!r} is not valid base64") from None
    if len(raw) != 32:
        raise SchemaError(f"key file field {name!r} must decode to 32 bytes, got {len(raw)}")
    return raw


def _parse_key_json(text: str | bytes, fmt: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SchemaError(f"key file is not JSON: {exc}") from None
    expected = {"format", "version", "signing_ed25519", "encryption_x25519"}
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise SchemaError(f"not a {fmt} file")
    if obj.get("version") != _KEY_FILE_VERSION:
        raise SchemaError(f"{fmt} file version {obj.get('version')!r} is not {_KEY_FILE_VERSION}")
    if set(obj) != expected:
        raise SchemaError(f"{fmt} file fields {sorted(obj)} are not {sorted(expected)}")
    return obj


def _write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write atomically, never letting the bytes exist under a looser mode than 0600."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite a key file (pass overwrite=True)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # O_EXCL + mode 0600 at creation: the umask can only narrow it, and no other process can
    # have opened the file before the secret is in it.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _read_private(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file")
        if os.name == "posix" and st.st_mode & 0o077:
            raise KeyFilePermissionError(
                f"private key file {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others "
                f"can access it, so it is refused unread; fix with `chmod 600 {path}` "
                "(and rotate the keys if others may have read them)"
            )
        return fh.read()


def save_private_keys(keys: DeviceKeys, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``keys`` as JSON with mode 0600. Refuses to replace a file unless ``overwrite``."""
    p = Path(path)
    text = json.dumps(
        {
            "format": _PRIVATE_FORMAT,
            "version": _KEY_FILE_VERSION,
            "signing_ed25519": base64.b64encode(keys.signing_seed).decode(),
            "encryption_x25519": base64.b64encode(keys.encryption_secret).decode(),
        },
        indent=2,
    ) + "\n"
    _write_private(p, text.encode(), overwrite=overwrite)
    log.info("wrote private keys %s (fingerprint %s)", p, keys.public.fingerprint())
    return p


def load_private_keys(path: str | os.PathLike[str]) -> DeviceKeys:
    """Read a private key file; ``KeyFilePermissionError`` if group/others can access it,
    ``SchemaError`` if it is malformed."""
    return parse_private_keys(_read_private(Path(path)))


def parse_private_keys(data: str | bytes) -> DeviceKeys:
    """Private keys from the text of a key file (``SchemaError`` if malformed). ``load_private_keys``
    is the way to load one's own keys; this is for checking a file already read, whatever its mode."""
    obj = _parse_key_json(data, _PRIVATE_FORMAT)
    return DeviceKeys(
        signing_seed=_b64key(obj, "signing_ed25519"), encryption_secret=_b64key(obj, "encryption_x25519")
    )


def save_public_keys(public: PublicKeys, path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(public.to_json())
    os.replace(tmp, p)
    return p


def load_public_keys(path: str | os.PathLike[str]) -> PublicKeys:
    """Read a public key file (``SchemaError`` if malformed)."""
    return PublicKeys.from_json(Path(path).read_bytes())


# --- seal / open, sign / verify --------------------------------------------------------------------


def _as_bytes(name: str, data: Any) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes-like, got {type(data).__name__}")
    return bytes(data)


def seal(plaintext: bytes, *, recipient: PublicKeys, sender: DeviceKeys, aad: AssociatedData) -> bytes:
    """Encrypt ``plaintext`` to ``recipient`` and sign it as ``sender``, bound to ``aad``.

    The result is ``len(plaintext) + SEAL_OVERHEAD`` bytes.
    """
    return _hazmat.seal(
        _as_bytes("plaintext", plaintext),
        recipient_enc_pub=recipient.encryption,
        sender_signing_seed=sender.signing_seed,
        aad=aad.encode(),
    )


def open_sealed(blob: bytes, *, recipient: DeviceKeys, sender: PublicKeys, aad: AssociatedData) -> bytes:
    """Verify and decrypt a ``seal`` blob; ``CryptoError`` on any failure (wrong key, wrong
    sender, tampered or truncated bytes, or an ``aad`` other than the one it was sealed with)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CryptoError(f"sealed message must be bytes, got {type(blob).__name__}")
    return _hazmat.open_sealed(
        bytes(blob),
        recipient_enc_secret=recipient.encryption_secret,
        sender_signing_pub=sender.signing,
        aad=aad.encode(),
    )


def sign(message: bytes, key: DeviceKeys, *, aad: AssociatedData) -> bytes:
    """Return ``message`` framed with an Ed25519 signature bound to ``aad`` (not encrypted)."""
    return _hazmat.sign(_as_bytes("message", message), signing_seed=key.signing_seed, aad=aad.encode())


def signed_payload(signed_blob: bytes) -> bytes:
    """The payload of a ``sign`` blob, NOT verified: to learn which key to verify it with."""
    if not isinstance(signed_blob, (bytes, bytearray, memoryview)) or len(signed_blob) < _hazmat.SIGN_OVERHEAD:
        raise CryptoError("signed message is truncated")
    return bytes(signed_blob[_hazmat.SIGN_HEADER_LEN : -_hazmat.SIG_LEN])


def verify(signed_blob: bytes, public: PublicKeys, *, aad: AssociatedData) -> bytes:
    """Return the payload of a ``sign`` blob; ``CryptoError`` unless it verifies under ``public``
    and ``aad``."""
    if not isinstance(signed_blob, (bytes, bytearray, memoryview)):
        raise CryptoError(f"signed message must be bytes, got {type(signed_blob).__name__}")
    return _hazmat.verify(bytes(signed_blob), signing_pub=public.signing, aad=aad.encode())


# --- broker TLS ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes for a private CA and one server certificate signed by it (ECDSA P-256)."""

    ca_cert_pem: bytes
    ca_key_pem: bytes = field(repr=False)
    server_cert_pem: bytes
    server_key_pem: bytes = field(repr=False)


def make_server_tls(host: str, *, days: int = 825) -> TlsMaterial:
    """A fresh CA and a server certificate valid for ``host``, ``localhost`` and ``127.0.0.1``
    (serverAuth only), for the MQTT broker. Clients pin the CA certificate."""
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    ca, ca_key, srv, srv_key = _hazmat.make_tls_certificates(host, days)
    return TlsMaterial(ca_cert_pem=ca, ca_key_pem=ca_key, server_cert_pem=srv, server_key_pem=srv_key)


def certificate_windows(pem: bytes) -> list[tuple[float, float]]:
    """The validity window (not before, not after; POSIX seconds) of each certificate in a PEM
    file's bytes: what a device's clock must fall within for TLS to accept it."""
    return _hazmat.certificate_windows(pem)


def write_keypair(out_dir: str | Path, stem: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Fresh keys as ``STEM.key`` (private, 0600) and ``STEM.pub.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = generate_keys()
    priv = save_private_keys(keys, out / f"{stem}.key", overwrite=overwrite)
    pub = out / f"{stem}.pub.json"
    save_public_keys(keys.public, pub)
    return Path(priv), pub
