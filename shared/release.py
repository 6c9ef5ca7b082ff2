"""The release manifest: what a device checks before it serves a new student.

The aggregator signs the manifest (Ed25519, bound to the fleet's broadcast ``release`` kind and
the round); it names every file with its size and SHA-256, so one signature covers the whole
directory. A device verifies the signature under the pinned aggregator key, that the manifest is
for its own fleet, and every file's digest, before anything is installed (``edge_client.releases``).
Canonical JSON (``shared.canonical``: sorted keys, no spaces): both sides hash the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared import crypto
from shared.canonical import canonical_json
from shared.errors import SchemaError

KIND = "release"
MANIFEST = "release.json"  # the signed manifest, beside the files it names
RELEASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # plain names: no directories, no ..
MAX_FILES = 64


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ReleaseManifest:
    release_id: str
    fleet: str  # the fleet this release is for: a device refuses another fleet's
    round: int
    mode: str
    base_model: str
    tokenizer_sha256: str
    quantization: str  # none or int8
    files: tuple[FileEntry, ...]
    parity: dict[str, Any] = field(default_factory=dict)
    rollback_of: str = ""  # a rollback announcement names the release it replaces

    def __post_init__(self) -> None:
        if not RELEASE_ID_RE.match(self.release_id):
            raise SchemaError(f"release_id {self.release_id!r} is not a plain name")
        if not 1 <= len(self.files) <= MAX_FILES:
            raise SchemaError(f"a release names 1..{MAX_FILES} files, got {len(self.files)}")
        names = [f.name for f in self.files]
        if len(set(names)) != len(names) or not all(FILE_RE.match(n) for n in names):
            raise SchemaError(f"release file names must be plain and distinct: {names}")
        if any(f.size < 0 or not re.fullmatch(r"[0-9a-f]{64}", f.sha256) for f in self.files):
            raise SchemaError("release file sizes must be >= 0 and digests 64 hex digits")
        if self.quantization not in ("none", "int8"):
            raise SchemaError(f"quantization must be none or int8, got {self.quantization!r}")

    def encode(self) -> bytes:
        return canonical_json(asdict(self))

    @staticmethod
    def decode(data: bytes) -> ReleaseManifest:
        try:
            d = json.loads(data)
            files = tuple(FileEntry(str(f["name"]), int(f["size"]), str(f["sha256"])) for f in d.pop("files"))
            known = {"release_id", "fleet", "round", "mode", "base_model", "tokenizer_sha256", "quantization", "parity",
                     "rollback_of"}
            if set(d) - known:
                raise SchemaError(f"unknown manifest fields {sorted(set(d) - known)}")
            return ReleaseManifest(files=files, **{k: d[k] for k in known if k in d})
        except (ValueError, KeyError, TypeError) as e:
            raise SchemaError(f"malformed release manifest: {type(e).__name__}: {e}") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe(directory: Path) -> tuple[FileEntry, ...]:
    """Every plain file of a release directory (the manifest itself excluded), sorted by name."""
    return tuple(FileEntry(p.name, p.stat().st_size, sha256_file(p))
                 for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST)


def tokenizer_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        p = directory / name
        if p.exists():
            h.update(name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _aad(m_round: int) -> crypto.AssociatedData:
    return crypto.AssociatedData(round=m_round, device_id=crypto.BROADCAST, kind=KIND)


def sign(m: ReleaseManifest, key: crypto.DeviceKeys) -> bytes:
    return crypto.sign(m.encode(), key, aad=_aad(m.round))


def verify(blob: bytes, aggregator: crypto.PublicKeys, fleet: str) -> ReleaseManifest:
    """The manifest, if signed by the pinned aggregator key and meant for ``fleet``; else SchemaError."""
    try:
        unverified = ReleaseManifest.decode(crypto.signed_payload(blob))
        payload = crypto.verify(blob, aggregator, aad=_aad(unverified.round))
    except crypto.CryptoError as e:
        raise SchemaError(f"release manifest signature does not verify: {e}") from None
    m = ReleaseManifest.decode(payload)
    if m.fleet != fleet:
        raise SchemaError(f"release {m.release_id} is for fleet {m.fleet!r}, not this device's fleet {fleet!r}")
    return m


def check_files(m: ReleaseManifest, directory: Path) -> None:
    """Every named file present with its size and digest; SchemaError naming the first that is not."""
    for f in m.files:
        p = directory / f.name
        if not p.is_file():
            raise SchemaError(f"release {m.release_id}: file {f.name} is missing")
        if p.stat().st_size != f.size:
            raise SchemaError(f"release {m.release_id}: {f.name} is {p.stat().st_size} bytes, the manifest says {f.size}")
        if sha256_file(p) != f.sha256:
            raise SchemaError(f"release {m.release_id}: {f.name} does not match its SHA-256 in the manifest")
