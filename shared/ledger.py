"""The device ledger: an append-only, hash-chained, signed record of every message a device sent.

Why: secure aggregation hides an update from the aggregator, but a privacy auditor also has to be
able to check afterwards what left the device at all. Each message is recorded as it is sealed
or signed for sending (``edge_client.client``): the time, kind, round, size and SHA-256 of the
exact bytes handed to the broker, and what is inside by name and size only (tensor and field
names, lengths, small scalars), never the values.

Format: JSON Lines, one entry per line, readable as it is::

    {"entry": {"seq": 3, "prev": "<sha256 of line 2>", "at": ..., "device": ..., "kind": ..., ...},
     "signed": "<base64 of shared.crypto.sign(canonical(entry), device key)>"}

- ``prev`` chains each line to the bytes of the one before (64 zeros for the first), so an edit,
  a deletion, a reordering or an insertion breaks the chain at the first line after it;
- ``signed`` is the device key's signature over the entry's canonical JSON (bound to the
  ledger, the device and the sequence number), so a line cannot be rewritten and re-chained by
  anyone without the device's private key;
- the first entry (``kind`` "genesis") names the device and its key's fingerprint.

What the chain cannot show alone: lines cut off the end. ``verify`` reports the head (last
sequence number and the hash of the last line) for comparing with a copy taken earlier, or with
what the aggregator recorded.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import crypto
from shared.canonical import canonical_json

log = logging.getLogger(__name__)

GENESIS_PREV = "0" * 64
LEDGER_KIND = "ledger"  # the signature's associated-data kind: a ledger signature is valid nowhere else
VERSION = 1


def canonical(obj: Mapping[str, Any]) -> bytes:
    """An entry's or a line's bytes: ``shared.canonical.canonical_json`` (the one signed-JSON form)."""
    return canonical_json(obj)


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _aad(device: str, seq: int) -> crypto.AssociatedData:
    return crypto.AssociatedData(seq, device, LEDGER_KIND)


def describe(msg: Any) -> dict[str, Any]:
    """What is inside a message by name and size only: bytes and sequences by length, nested
    messages (tensors) by their own description, small scalars as they are; never raw values of
    an update."""
    if not dataclasses.is_dataclass(msg) or isinstance(msg, type):
        return {"type": type(msg).__name__}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(msg):
        v = getattr(msg, f.name)
        if v is None:
            continue
        if isinstance(v, (bytes, bytearray, memoryview)):
            out[f.name] = {"bytes": len(v)}
        elif isinstance(v, bool) or isinstance(v, (int, float)) or (isinstance(v, str) and len(v) <= 120):
            out[f.name] = v
        elif isinstance(v, str):
            out[f.name] = {"chars": len(v)}
        elif isinstance(v, (tuple, list)):
            items = [describe(x) for x in v[:4096] if dataclasses.is_dataclass(x)]
            out[f.name] = {"items": len(v), **({"first": items} if items else {})}
        elif dataclasses.is_dataclass(v):
            out[f.name] = describe(v)
        else:
            out[f.name] = {"type": type(v).__name__}
    return out


class Ledger:
    """Appends signed, chained entries to ``path`` (created with a genesis entry when new).

    Each append is written and fsync'ed before the message it records is handed to the broker,
    so a message that left is never missing from the ledger (a crash can leave an entry for a
    message that did not leave, never the reverse). The same holds for the messages the broker
    sends for the device: its last will and its reconnect status are recorded when they are
    prepared, whether or not the broker ever sends them.
    """

    def __init__(self, path: str | Path, device: str, key: crypto.DeviceKeys) -> None:
        self.path, self.device, self.key = Path(path), device, key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.seq, self.prev = -1, GENESIS_PREV
        aside = None
        if self.path.exists() and self.path.stat().st_size > 0:
            try:
                head = verify(self.path, key.public)  # never extend a ledger that does not verify
                if head.device != device:
                    raise LedgerError(f"a ledger of {head.device!r}, not {device!r}")
                self.seq, self.prev = head.seq, head.hash
                return
            except LedgerError as e:
                # Kept as evidence, never overwritten: the new ledger's first entry names it.
                aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
                os.replace(self.path, aside)
                log.error("%s does not verify (%s): moved to %s; a new ledger starts, naming it", self.path, e, aside.name)
        self.append("genesis", 0, 0, "", {"version": VERSION, "key": key.public.fingerprint(),
                                           **({"previous_ledger_damaged": aside.name} if aside else {})})

    def append(self, kind: str, rnd: int, size: int, sha256: str, detail: Mapping[str, Any]) -> None:
        entry = {"seq": self.seq + 1, "prev": self.prev, "at": round(time.time(), 3), "device": self.device, "kind": kind,
                 "round": rnd, "bytes": size, "sha256": sha256, "detail": dict(detail)}
        signed = crypto.sign(canonical(entry), self.key, aad=_aad(self.device, entry["seq"]))
        line = canonical({"entry": entry, "signed": base64.b64encode(signed).decode()})
        with self.path.open("ab") as f:
            f.write(line + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.seq, self.prev = entry["seq"], line_hash(line)

    def record(self, kind: str, rnd: int, wire: bytes, msg: Any, extra: Mapping[str, Any] | None = None) -> None:
        """Record one message about to leave: its exact wire bytes' size and digest, what is inside
        (and ``extra``: for a masked update, its clip, its noise and the device's epsilon after it)."""
        self.append(kind, rnd, len(wire), hashlib.sha256(wire).hexdigest(), {**describe(msg), **(extra or {})})


class LedgerError(Exception):
    """The ledger does not verify; the message names the first bad line and what is wrong."""


@dataclass(frozen=True)
class Head:
    device: str
    seq: int  # the last entry's sequence number
    hash: str  # SHA-256 of the last line
    entries: int
    kinds: Mapping[str, int]
    bytes: int  # sum of the recorded messages' sizes


def entries(path: str | Path) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
    """(line number, line bytes, parsed entry) for each line; LedgerError on one that does not parse."""
    with Path(path).open("rb") as f:
        for no, raw in enumerate(f, 1):
            line = raw.rstrip(b"\n")
            try:
                obj = json.loads(line)
                entry, signed = obj["entry"], obj["signed"]
                if not isinstance(entry, dict) or not isinstance(signed, str) or set(obj) != {"entry", "signed"}:
                    raise ValueError("not an entry and its signature")
            except (ValueError, KeyError, TypeError) as e:
                raise LedgerError(f"line {no}: not a ledger entry ({e})") from None
            yield no, line, obj


def verify(path: str | Path, public: crypto.PublicKeys) -> Head:
    """Check every line's chain link, sequence number and signature; the head, or LedgerError
    naming the first bad line (an edit, a deletion, a reordering, an insertion)."""
    p = Path(path)
    if not p.exists():
        raise LedgerError(f"{p}: no such ledger")
    prev, seq, device, n, total = GENESIS_PREV, -1, None, 0, 0
    kinds: dict[str, int] = {}
    for no, line, obj in entries(p):
        e = obj["entry"]
        where = f"line {no} (seq {e.get('seq')!r}, {e.get('kind')!r})"
        if canonical(obj) != line:
            raise LedgerError(f"{where}: not in canonical form (edited by hand?)")
        if e.get("prev") != prev:
            raise LedgerError(f"{where}: its chain link does not match line {no - 1 if no > 1 else 'none'} "
                              "(a line before it was edited, deleted, inserted or moved)")
        if e.get("seq") != seq + 1:
            raise LedgerError(f"{where}: sequence number {e.get('seq')!r} where {seq + 1} was due (a line deleted, inserted or moved)")
        if no == 1:
            if e.get("kind") != "genesis" or not isinstance(e.get("device"), str):
                raise LedgerError(f"{where}: the first entry is not the genesis entry")
            device = e["device"]
            if e.get("detail", {}).get("key") != public.fingerprint():
                raise LedgerError(f"{where}: the ledger names key {e.get('detail', {}).get('key')!r}, not the given key "
                                  f"{public.fingerprint()}")
        elif e.get("device") != device:
            raise LedgerError(f"{where}: entry of device {e.get('device')!r} in the ledger of {device!r}")
        try:
            signed = base64.b64decode(obj["signed"], validate=True)
            payload = crypto.verify(signed, public, aad=_aad(str(device), int(e["seq"])))
        except (ValueError, crypto.CryptoError) as err:
            raise LedgerError(f"{where}: signature does not verify under the device's key ({err})") from None
        if payload != canonical(e):
            raise LedgerError(f"{where}: the entry differs from what the device signed (edited)")
        prev, seq, n = line_hash(line), int(e["seq"]), n + 1
        kinds[str(e["kind"])] = kinds.get(str(e["kind"]), 0) + 1
        total += int(e.get("bytes", 0))
    if device is None:
        raise LedgerError(f"{p}: empty ledger")
    return Head(device=device, seq=seq, hash=prev, entries=n, kinds=kinds, bytes=total)
