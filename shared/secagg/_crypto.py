"""The only place in secagg that does key agreement, key derivation and share encryption.

Choices (internal constants, not knobs): X25519 for both key pairs (35 us an agreement, 32-byte
keys; Flower uses SECP384R1), HKDF-SHA256 with a label per purpose so the share-encryption key and
the mask seed derived from different key pairs can never coincide, and ChaCha20-Poly1305 with a
random 96-bit nonce for the few hundred bytes of shares per neighbour. Associated data binds the
protocol label, round, sender and recipient, so a share cannot be replayed into another round or
redirected to another client.

The primitives themselves live in ``shared._hazmat`` (the one module that imports hazmat); this
module owns the secagg labels, the nonce and the associated-data layout, and its error types.
"""

from __future__ import annotations

import os
import struct

from shared import _hazmat
from shared.errors import ProtocolError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_LABEL = b"fl-minillm/secagg/v1"
_INFO_SHARE = _LABEL + b"/share-encryption"
_INFO_MASK = _LABEL + b"/pairwise-mask"


class ShareDecryptionError(ProtocolError):
    """An encrypted share failed authentication (tampered, truncated, replayed or wrong key)."""


def new_keypair() -> tuple[bytes, bytes]:
    """Return (private, public) raw 32-byte X25519 keys."""
    return _hazmat.x25519_keypair()


def public_from_private(sk: bytes) -> bytes:
    return _hazmat.x25519_public(sk)


def _agree(sk: bytes, peer_pk: bytes, info: bytes, round_id: int) -> bytes:
    try:
        raw = _hazmat.x25519_exchange(sk, peer_pk)
    except _hazmat.CryptoError as exc:  # wrong length or an all-zero (small-order) shared secret
        raise ProtocolError(f"X25519 agreement failed: {exc}") from exc
    return _hazmat.hkdf_sha256(raw, length=KEY_BYTES, salt=None, info=info + struct.pack(">Q", round_id))


def share_key(sk: bytes, peer_pk: bytes, round_id: int) -> bytes:
    """Symmetric key for the shares exchanged between two clients in one round."""
    return _agree(sk, peer_pk, _INFO_SHARE, round_id)


def mask_seed(sk: bytes, peer_pk: bytes, round_id: int) -> bytes:
    """The 256-bit PRG seed s_uv of the pairwise mask; both ends derive the same value."""
    return _agree(sk, peer_pk, _INFO_MASK, round_id)


def _ad(round_id: int, sender: int, recipient: int, context: bytes = b"") -> bytes:
    return _LABEL + struct.pack(">QII", round_id, sender, recipient) + context


def seal(key: bytes, round_id: int, sender: int, recipient: int, plaintext: bytes, context: bytes = b"", *,
         nonce: bytes | None = None) -> bytes:
    """nonce || ChaCha20-Poly1305(plaintext) with the (round, sender, recipient, context) binding.

    ``nonce`` exists only for known-answer tests (golden bytes); production callers leave it None.
    """
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    elif len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
    return nonce + _hazmat.chacha20poly1305_encrypt(key, nonce, plaintext, _ad(round_id, sender, recipient, context))


def open_sealed(key: bytes, round_id: int, sender: int, recipient: int, blob: bytes, context: bytes = b"") -> bytes:
    """Inverse of ``seal``; every failure is a ``ShareDecryptionError``."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ShareDecryptionError(f"ciphertext from {sender} to {recipient} is truncated ({len(blob)} bytes)")
    try:
        return _hazmat.chacha20poly1305_decrypt(key, blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                                _ad(round_id, sender, recipient, context))
    except _hazmat.CryptoError as exc:
        raise ShareDecryptionError(
            f"share from {sender} to {recipient} in round {round_id} failed authentication") from exc
