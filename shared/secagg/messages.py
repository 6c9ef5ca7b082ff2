"""Wire messages of the SecAgg+ round: frozen dataclasses and their exact binary encoding.

Why a hand-rolled layout: every field is a fixed-width integer, a 32-byte key, an opaque
ciphertext or a uint32 vector, so a struct layout is smaller than protobuf and trivially strict
(decoding rejects wrong magic, version, kind, and any leftover or missing byte). The masked vector
travels as raw little-endian uint32: 4 bytes a coordinate, half of Flower's int64 arrays.

Header (16 bytes): b"SA", version u8, kind u8, round u64, node u32 (sender, or recipient for
server-to-client messages). All integers big-endian except the vector payload.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Union

from shared.errors import SchemaError, TruncatedError, VersionError
from shared.secagg.shamir import SHARE_BYTES

# 2: adverts commit to a graph-seed contribution (``AdvertList``, ``SeedReveal``), ``SignedKeys``
# carries the revealed contributions instead of the digest list, and the unmask request carries
# the adverts of signers outside the recipient's neighbourhood (``shared.secagg.hardened``).
VERSION = 2
_MAGIC = b"SA"
_HEADER = struct.Struct(">2sBBQI")
_U32 = struct.Struct(">I")
_KEY = 32


@dataclass(frozen=True)
class AdvertiseKeys:
    """Stage 0, client -> server: c_pk encrypts shares, s_pk derives pairwise masks."""

    round_id: int
    sender: int
    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True)
class KeyEntry:
    node: int
    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True)
class NeighbourKeys:
    """Stage 0 reply, server -> client: the advertised keys of the recipient's neighbourhood."""

    round_id: int
    recipient: int
    keys: tuple[KeyEntry, ...]


@dataclass(frozen=True)
class Sealed:
    """An encrypted share bundle; ``peer`` is the recipient (upload) or the sender (download)."""

    peer: int
    blob: bytes


@dataclass(frozen=True)
class ShareKeys:
    """Stage 1, client -> server: one sealed bundle of (b_u share, s_u^SK share) per neighbour."""

    round_id: int
    sender: int
    sealed: tuple[Sealed, ...]


@dataclass(frozen=True)
class ForwardedShares:
    """Stage 1 reply, server -> client: the bundles addressed to the recipient."""

    round_id: int
    recipient: int
    sealed: tuple[Sealed, ...]


@dataclass(frozen=True)
class MaskedInput:
    """Stage 2, client -> server: y_u as little-endian uint32 bytes."""

    round_id: int
    sender: int
    masked: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 2 reply, server -> client: who survived (send b shares) and who dropped (send s shares)."""

    round_id: int
    recipient: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class OwnedShare:
    owner: int
    share: bytes


@dataclass(frozen=True)
class UnmaskShares:
    """Stage 3, client -> server: shares of b_v for surviving v, of s_v^SK for dropped v."""

    round_id: int
    sender: int
    seed_shares: tuple[OwnedShare, ...]
    key_shares: tuple[OwnedShare, ...]


# --- the hardened round (``shared.secagg.hardened``): signed adverts and a consistency check ---


@dataclass(frozen=True)
class SignedAdvertise:
    """Stage 0, client -> server: the keys, a commitment to this node's graph-seed contribution,
    the sender's certificate, and its signature over them."""

    round_id: int
    sender: int
    c_pk: bytes
    s_pk: bytes
    commit: bytes  # SHA-256 commitment to the 32-byte contribution the node reveals in SeedReveal
    cert: bytes  # shared.authority.Certificate.blob
    sig: bytes  # shared.crypto.sign blob over the advert payload, with the certified key


@dataclass(frozen=True)
class SignedEntry:
    node: int
    c_pk: bytes
    s_pk: bytes
    commit: bytes
    cert: bytes
    sig: bytes


@dataclass(frozen=True)
class ListEntry:
    node: int
    digest: bytes  # SHA-256 of the node's encoded SignedAdvertise
    commit: bytes  # its SignedAdvertise.commit


@dataclass(frozen=True)
class AdvertList:
    """Stage 0 reply, server -> client: every advert the round counts, fixed before any node
    reveals its graph-seed contribution (so nobody can pick the set after seeing the seed)."""

    round_id: int
    recipient: int
    entries: tuple[ListEntry, ...]  # by node


@dataclass(frozen=True)
class SeedReveal:
    """Stage 0b, client -> server: the contribution its advert committed to."""

    round_id: int
    sender: int
    rho: bytes


@dataclass(frozen=True)
class SignedKeys:
    """Stage 0b reply, server -> client: every listed node's revealed contribution (the graph
    derives from them) and the signed adverts of the recipient's neighbourhood."""

    round_id: int
    recipient: int
    rhos: tuple[tuple[int, bytes], ...]  # (node, contribution), by node
    keys: tuple[SignedEntry, ...]


@dataclass(frozen=True)
class ConsistencyRequest:
    """Stage 2 reply, server -> client: the survivor set every survivor is asked to sign."""

    round_id: int
    recipient: int
    survivors: tuple[int, ...]
    list_hash: bytes  # SHA-256 of the advert digest list: the same graph for everyone


@dataclass(frozen=True)
class ConsistencySig:
    """Consistency check, client -> server: its signature over (round, list hash, survivors)."""

    round_id: int
    sender: int
    sig: bytes


@dataclass(frozen=True)
class SignedUnmaskRequest:
    """Consistency reply, server -> client: the survivors and the signatures that agree on them."""

    round_id: int
    recipient: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    sigs: tuple[tuple[int, bytes], ...]  # (node, ConsistencySig.sig)
    # The adverts of signers outside the recipient's neighbourhood: it checks, for every node whose
    # share it reveals, t signatures from that node's own neighbourhood.
    signers: tuple[SignedEntry, ...] = ()


@dataclass(frozen=True)
class BundleReceipt:
    """Stage 2, client -> server, before training: the neighbours whose share bundle did not open.

    Each rejected pair is cut from the graph (neither side masks with, or reveals shares of, the
    other), so one bad bundle costs an edge, not everyone's round.
    """

    round_id: int
    sender: int
    rejected: tuple[int, ...]


@dataclass(frozen=True)
class MaskPeers:
    """Stage 2 reply, server -> client: the neighbours to mask with, after the cuts."""

    round_id: int
    recipient: int
    peers: tuple[int, ...]


Message = Union[AdvertiseKeys, NeighbourKeys, ShareKeys, ForwardedShares, MaskedInput, UnmaskRequest,
                UnmaskShares, SignedAdvertise, SignedKeys, ConsistencyRequest, ConsistencySig, SignedUnmaskRequest,
                BundleReceipt, MaskPeers, AdvertList, SeedReveal]
_KINDS: dict[type, int] = {AdvertiseKeys: 1, NeighbourKeys: 2, ShareKeys: 3, ForwardedShares: 4,
                           MaskedInput: 5, UnmaskRequest: 6, UnmaskShares: 7, SignedAdvertise: 8, SignedKeys: 9,
                           ConsistencyRequest: 10, ConsistencySig: 11, SignedUnmaskRequest: 12,
                           BundleReceipt: 13, MaskPeers: 14, AdvertList: 15, SeedReveal: 16}
_BY_KIND = {v: k for k, v in _KINDS.items()}


_TO_CLIENT = (NeighbourKeys, ForwardedShares, UnmaskRequest, SignedKeys, ConsistencyRequest, SignedUnmaskRequest,
              MaskPeers, AdvertList)
MAX_BLOB = 1 << 16  # a certificate or a signature: far below this


def _node(msg: Message) -> int:
    return msg.recipient if isinstance(msg, _TO_CLIENT) else msg.sender  # type: ignore[union-attr]


def _blob(b: bytes) -> bytes:
    if len(b) > MAX_BLOB:
        raise SchemaError(f"secagg field of {len(b)} bytes exceeds {MAX_BLOB}")
    return _U32.pack(len(b)) + b


def _ids(ids: tuple[int, ...]) -> bytes:
    return _U32.pack(len(ids)) + struct.pack(f">{len(ids)}I", *ids)


def _key(b: bytes) -> bytes:
    if len(b) != _KEY:
        raise SchemaError(f"secagg key field of {len(b)} bytes, expected {_KEY}")
    return b


def _entries(entries: tuple[SignedEntry, ...]) -> bytes:
    out = [_U32.pack(len(entries))]
    for e in entries:
        out += [_U32.pack(e.node), _key(e.c_pk), _key(e.s_pk), _key(e.commit), _blob(e.cert), _blob(e.sig)]
    return b"".join(out)


def encode(msg: Message) -> bytes:
    """Serialize ``msg``; ``len(encode(m))`` is what the benchmark counts as bytes on the wire."""
    parts = [_HEADER.pack(_MAGIC, VERSION, _KINDS[type(msg)], msg.round_id, _node(msg))]
    if isinstance(msg, AdvertiseKeys):
        parts += [msg.c_pk, msg.s_pk]
    elif isinstance(msg, NeighbourKeys):
        parts.append(_U32.pack(len(msg.keys)))
        for e in msg.keys:
            parts += [_U32.pack(e.node), e.c_pk, e.s_pk]
    elif isinstance(msg, (ShareKeys, ForwardedShares)):
        parts.append(_U32.pack(len(msg.sealed)))
        for s in msg.sealed:
            parts += [struct.pack(">II", s.peer, len(s.blob)), s.blob]
    elif isinstance(msg, MaskedInput):
        parts += [_U32.pack(len(msg.masked) // 4), msg.masked]
    elif isinstance(msg, UnmaskRequest):
        for ids in (msg.survivors, msg.dropped):
            parts.append(_U32.pack(len(ids)) + struct.pack(f">{len(ids)}I", *ids))
    elif isinstance(msg, SignedAdvertise):
        parts += [_key(msg.c_pk), _key(msg.s_pk), _key(msg.commit), _blob(msg.cert), _blob(msg.sig)]
    elif isinstance(msg, SignedKeys):
        parts.append(_U32.pack(len(msg.rhos)))
        for node, rho in msg.rhos:
            parts += [_U32.pack(node), _key(rho)]
        parts.append(_entries(msg.keys))
    elif isinstance(msg, AdvertList):
        parts.append(_U32.pack(len(msg.entries)))
        for le in msg.entries:
            parts += [_U32.pack(le.node), _key(le.digest), _key(le.commit)]
    elif isinstance(msg, SeedReveal):
        parts.append(_key(msg.rho))
    elif isinstance(msg, ConsistencyRequest):
        parts += [_ids(msg.survivors), msg.list_hash]
    elif isinstance(msg, ConsistencySig):
        parts.append(_blob(msg.sig))
    elif isinstance(msg, BundleReceipt):
        parts.append(_ids(msg.rejected))
    elif isinstance(msg, MaskPeers):
        parts.append(_ids(msg.peers))
    elif isinstance(msg, SignedUnmaskRequest):
        parts += [_ids(msg.survivors), _ids(msg.dropped), _U32.pack(len(msg.sigs))]
        for node, sig in msg.sigs:
            parts += [_U32.pack(node), _blob(sig)]
        parts.append(_entries(msg.signers))
    else:
        for shares in (msg.seed_shares, msg.key_shares):
            parts.append(_U32.pack(len(shares)))
            for o in shares:
                parts += [_U32.pack(o.owner), o.share]
    return b"".join(parts)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise TruncatedError(f"message ends at byte {len(self.data)}, needed {self.pos + n}")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def blob(self) -> bytes:
        n = self.u32()
        if n > MAX_BLOB:
            raise SchemaError(f"secagg field of {n} bytes exceeds {MAX_BLOB}")
        return self.take(n)

    def ids(self) -> tuple[int, ...]:
        return tuple(self.u32() for _ in range(self.count(4)))

    def entries(self) -> tuple[SignedEntry, ...]:
        return tuple(SignedEntry(self.u32(), self.take(_KEY), self.take(_KEY), self.take(_KEY), self.blob(), self.blob())
                     for _ in range(self.count(4 + 3 * _KEY + 8)))

    def count(self, item_bytes: int) -> int:
        n = self.u32()
        if n * item_bytes > len(self.data) - self.pos:
            raise TruncatedError(f"count {n} of {item_bytes}-byte items overruns the message")
        return n


def decode(data: bytes) -> Message:
    """Parse and validate one message; raises a ``ProtocolError`` subclass on anything off."""
    r = _Reader(data)
    magic, version, kind, round_id, node = _HEADER.unpack(r.take(_HEADER.size))
    if magic != _MAGIC:
        raise SchemaError(f"not a secagg message (magic {magic!r})")
    if version != VERSION:
        raise VersionError(f"secagg wire version {version} is not {VERSION}")
    if kind not in _BY_KIND:
        raise SchemaError(f"unknown secagg message kind {kind}")
    cls = _BY_KIND[kind]
    msg: Message
    if cls is AdvertiseKeys:
        msg = AdvertiseKeys(round_id, node, r.take(_KEY), r.take(_KEY))
    elif cls is NeighbourKeys:
        keys = tuple(KeyEntry(r.u32(), r.take(_KEY), r.take(_KEY)) for _ in range(r.count(4 + 2 * _KEY)))
        msg = NeighbourKeys(round_id, node, keys)
    elif cls in (ShareKeys, ForwardedShares):
        sealed = []
        for _ in range(r.count(8)):
            peer, size = r.u32(), r.u32()
            sealed.append(Sealed(peer, r.take(size)))
        msg = cls(round_id, node, tuple(sealed))
    elif cls is MaskedInput:
        msg = MaskedInput(round_id, node, r.take(4 * r.count(4)))
    elif cls is UnmaskRequest:
        surv = tuple(r.u32() for _ in range(r.count(4)))
        drop = tuple(r.u32() for _ in range(r.count(4)))
        msg = UnmaskRequest(round_id, node, surv, drop)
    elif cls is SignedAdvertise:
        msg = SignedAdvertise(round_id, node, r.take(_KEY), r.take(_KEY), r.take(_KEY), r.blob(), r.blob())
    elif cls is SignedKeys:
        rhos = tuple((r.u32(), r.take(_KEY)) for _ in range(r.count(4 + _KEY)))
        msg = SignedKeys(round_id, node, rhos, r.entries())
    elif cls is AdvertList:
        listed = tuple(ListEntry(r.u32(), r.take(_KEY), r.take(_KEY)) for _ in range(r.count(4 + 2 * _KEY)))
        msg = AdvertList(round_id, node, listed)
    elif cls is SeedReveal:
        msg = SeedReveal(round_id, node, r.take(_KEY))
    elif cls is ConsistencyRequest:
        msg = ConsistencyRequest(round_id, node, r.ids(), r.take(_KEY))
    elif cls is ConsistencySig:
        msg = ConsistencySig(round_id, node, r.blob())
    elif cls is BundleReceipt:
        msg = BundleReceipt(round_id, node, r.ids())
    elif cls is MaskPeers:
        msg = MaskPeers(round_id, node, r.ids())
    elif cls is SignedUnmaskRequest:
        surv, drop = r.ids(), r.ids()
        sigs = tuple((r.u32(), r.blob()) for _ in range(r.count(8)))
        msg = SignedUnmaskRequest(round_id, node, surv, drop, sigs, r.entries())
    else:
        lists = []
        for _ in range(2):
            lists.append(tuple(OwnedShare(r.u32(), r.take(SHARE_BYTES)) for _ in range(r.count(4 + SHARE_BYTES))))
        msg = UnmaskShares(round_id, node, lists[0], lists[1])
    if r.pos != len(data):
        raise SchemaError(f"{len(data) - r.pos} trailing bytes after {cls.__name__}")
    return msg
