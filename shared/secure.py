"""Messages on the wire with security on: sealed (encrypted + signed) or signed, never bare.

Devices seal updates to the aggregator and sign their status; the aggregator signs what it
sends. The receiver checks the clear header against the topic it arrived on and the round it
expects, then opens or verifies under associated data rebuilt from that header; any mismatch
fails authentication. With ``insecure`` a bare message is sent and accepted instead; that mode is
only for debugging and every process that runs in it says so loudly at start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from shared import messages as M
from shared.crypto import AssociatedData, DeviceKeys, PublicKeys, open_sealed, seal, sign, verify
from shared.errors import ReplayError, SchemaError

T = TypeVar("T", bound=M.Message)

BROADCAST = "*"  # device_id in the associated data of messages to every device


@dataclass(frozen=True)
class Header:
    round: int
    device_id: str
    kind: str


def seal_message(msg: M.Message, *, round: int, device_id: str, sender: DeviceKeys, recipient: PublicKeys) -> bytes:
    aad = AssociatedData(round=round, device_id=device_id, kind=type(msg).KIND)
    blob = seal(M.encode(msg), recipient=recipient, sender=sender, aad=aad)
    return M.encode(M.Sealed(round=round, device_id=device_id, kind=type(msg).KIND, blob=blob))


def sign_message(msg: M.Message, *, round: int, device_id: str, key: DeviceKeys) -> bytes:
    aad = AssociatedData(round=round, device_id=device_id, kind=type(msg).KIND)
    blob = sign(M.encode(msg), key, aad=aad)
    return M.encode(M.Signed(round=round, device_id=device_id, kind=type(msg).KIND, blob=blob))


def peek(data: bytes) -> tuple[Header, bool]:
    """The clear header of a Sealed/Signed envelope, and whether it is sealed. Nothing is trusted yet."""
    outer = M.decode(data)
    if not isinstance(outer, (M.Sealed, M.Signed)):
        raise SchemaError(f"bare {type(outer).KIND!r} message refused: security is on")
    return Header(outer.round, outer.device_id, outer.kind), isinstance(outer, M.Sealed)


def open_message(
    data: bytes,
    expect: type[T],
    *,
    device_id: str,
    check_round: Callable[[int], None],
    recipient: DeviceKeys | None,
    sender: PublicKeys,
    sealed: bool,
) -> T:
    """Authenticate (and decrypt) an envelope whose header must name ``device_id`` and ``expect``.

    ``check_round`` raises ReplayError for a round the receiver will not accept. The inner message
    is decoded strictly and must agree with the header.
    """
    outer = M.decode(data)
    want_outer = M.Sealed if sealed else M.Signed
    if not isinstance(outer, want_outer):
        raise SchemaError(f"expected a {want_outer.KIND!r} envelope, got {type(outer).KIND!r}")
    if outer.device_id != device_id:
        raise ReplayError(f"message for {outer.device_id!r} arrived where {device_id!r} was expected")
    if outer.kind != expect.KIND:
        raise SchemaError(f"envelope holds {outer.kind!r}, expected {expect.KIND!r}")
    check_round(outer.round)
    aad = AssociatedData(round=outer.round, device_id=outer.device_id, kind=outer.kind)
    if sealed:
        assert recipient is not None
        inner = open_sealed(outer.blob, recipient=recipient, sender=sender, aad=aad)
    else:
        inner = verify(outer.blob, sender, aad=aad)
    msg = M.decode(inner, expect=expect)
    r = getattr(msg, "round", None)
    if r is not None and r != outer.round:
        raise ReplayError(f"inner round {r} differs from the authenticated round {outer.round}")
    d = getattr(msg, "device_id", None)
    if d is not None and device_id != BROADCAST and d != device_id:
        raise ReplayError(f"inner device {d!r} differs from the authenticated device {device_id!r}")
    return msg  # type: ignore[return-value]
