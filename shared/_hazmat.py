"""The only module that touches ``cryptography.hazmat``. Import ``shared.crypto`` instead.

Everything here works on raw bytes (32-byte seeds and public keys, already-encoded associated
data) so that no hazmat object leaks into the public surface. Every failure on the receiving side
becomes ``CryptoError``; which check failed is deliberately not told to the caller (it would help
an attacker and never helps the honest path).

Sealed blob (``seal``), all integers big-endian::

    header     = SEAL_MAGIC (4) | FORMAT_VERSION (1) | SUITE (1) | ephemeral X25519 public (32)
    ciphertext = AES-256-GCM(key, nonce, plaintext, aad = header | lp(aad_bytes))  (len + 16 tag)
    signature  = Ed25519(sender, SEAL_SIG_LABEL | recipient X25519 public | lp(aad_bytes)
                                  | header | ciphertext)                                (64)
    blob       = header | ciphertext | signature

    key | nonce = HKDF-SHA256(ikm = X25519(ephemeral, recipient), salt = eph_pub | recipient_pub,
                              info = SEAL_KDF_LABEL | sender Ed25519 public, length 32 + 12)

The AEAD key is fresh per message (fresh ephemeral key), so deriving the nonce from the same HKDF
output is safe and keeps the header short. Signed blob (``sign``)::

    blob = SIGN_MAGIC (4) | FORMAT_VERSION (1) | payload | Ed25519(SIGN_SIG_LABEL | lp(aad_bytes)
                                                                   | SIGN_MAGIC | version | payload)

``lp(x)`` is a 4-byte length prefix followed by ``x``, so no two field layouts collide.

It also makes the broker's TLS certificates (``make_tls_certificates``), so that no other module
needs hazmat key types either, and holds the raw primitives SecAgg+ builds on (X25519, HKDF-SHA256,
ChaCha20-Poly1305, the AES-256-CTR keystream); ``shared.secagg`` owns their framing, labels and
associated-data layout.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import struct
from collections.abc import Iterator

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import ProtocolError

# --- internal constants: changing any of them is a new FORMAT_VERSION -------------------------
SEAL_MAGIC = b"FLMs"
SIGN_MAGIC = b"FLMg"
FORMAT_VERSION = 1
SUITE_X25519_HKDFSHA256_AES256GCM = 1
SEAL_KDF_LABEL = b"flm/v1 seal x25519-hkdf-sha256 aes-256-gcm key+nonce"
SEAL_SIG_LABEL = b"flm/v1 seal ed25519 signature"
SIGN_SIG_LABEL = b"flm/v1 signed message ed25519 signature"

KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
SIG_LEN = 64
SEAL_HEADER_LEN = len(SEAL_MAGIC) + 2 + KEY_LEN
SIGN_HEADER_LEN = len(SIGN_MAGIC) + 1
SEAL_OVERHEAD = SEAL_HEADER_LEN + TAG_LEN + SIG_LEN
SIGN_OVERHEAD = SIGN_HEADER_LEN + SIG_LEN


class CryptoError(ProtocolError):
    """A sealed or signed message failed to decrypt or verify (or its keys are unusable).

    The single failure type of ``shared.crypto``: catch it, drop the message, carry on.
    """


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


# --- keys --------------------------------------------------------------------------------------


def new_signing_seed() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def new_x25519_secret() -> bytes:
    return X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def signing_public(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def x25519_public(secret: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def check_public_keys(signing_pub: bytes, encryption_pub: bytes) -> None:
    """Raise ``ValueError`` if either raw public key cannot be loaded."""
    Ed25519PublicKey.from_public_bytes(signing_pub)
    X25519PublicKey.from_public_bytes(encryption_pub)


# --- seal / open ---------------------------------------------------------------------------------


def _derive(shared_secret: bytes, eph_pub: bytes, recipient_pub: bytes, sender_sig_pub: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_LEN + NONCE_LEN,
        salt=eph_pub + recipient_pub,
        info=SEAL_KDF_LABEL + sender_sig_pub,
    ).derive(shared_secret)
    return okm[:KEY_LEN], okm[KEY_LEN:]


def seal(
    plaintext: bytes,
    *,
    recipient_enc_pub: bytes,
    sender_signing_seed: bytes,
    aad: bytes,
    ephemeral_secret: bytes | None = None,
) -> bytes:
    """Encrypt to ``recipient_enc_pub`` and sign as the sender. See the module docstring.

    ``ephemeral_secret`` exists only for known-answer tests; production callers leave it None.
    """
    eph = (
        X25519PrivateKey.generate()
        if ephemeral_secret is None
        else X25519PrivateKey.from_private_bytes(ephemeral_secret)
    )
    eph_pub = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signer = Ed25519PrivateKey.from_private_bytes(sender_signing_seed)
    sender_pub = signer.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        shared_secret = eph.exchange(X25519PublicKey.from_public_bytes(recipient_enc_pub))
    except ValueError as exc:  # low-order / malformed recipient key: nothing safe to encrypt to
        raise CryptoError(f"unusable recipient encryption key: {exc}") from None
    key, nonce = _derive(shared_secret, eph_pub, recipient_enc_pub, sender_pub)
    header = SEAL_MAGIC + bytes((FORMAT_VERSION, SUITE_X25519_HKDFSHA256_AES256GCM)) + eph_pub
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, header + _lp(aad))
    signature = signer.sign(SEAL_SIG_LABEL + recipient_enc_pub + _lp(aad) + header + ciphertext)
    return header + ciphertext + signature


def open_sealed(
    blob: bytes,
    *,
    recipient_enc_secret: bytes,
    sender_signing_pub: bytes,
    aad: bytes,
) -> bytes:
    """Verify the sender's signature, then decrypt. Any failure raises ``CryptoError``."""
    blob = bytes(blob)
    if len(blob) < SEAL_OVERHEAD:
        raise CryptoError("sealed message is truncated")
    header = blob[:SEAL_HEADER_LEN]
    ciphertext = blob[SEAL_HEADER_LEN:-SIG_LEN]
    signature = blob[-SIG_LEN:]
    if header[:4] != SEAL_MAGIC or header[4] != FORMAT_VERSION or header[5] != SUITE_X25519_HKDFSHA256_AES256GCM:
        raise CryptoError("not a sealed message of a format this build speaks")
    eph_pub = header[6:]
    recipient = X25519PrivateKey.from_private_bytes(recipient_enc_secret)
    recipient_pub = recipient.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    # Signature first: an unauthenticated blob never reaches the key exchange or the AEAD.
    try:
        Ed25519PublicKey.from_public_bytes(sender_signing_pub).verify(
            signature, SEAL_SIG_LABEL + recipient_pub + _lp(aad) + header + ciphertext
        )
    except (InvalidSignature, ValueError):
        raise CryptoError("sealed message failed verification") from None
    try:
        shared_secret = recipient.exchange(X25519PublicKey.from_public_bytes(eph_pub))
        key, nonce = _derive(shared_secret, eph_pub, recipient_pub, sender_signing_pub)
        return AESGCM(key).decrypt(nonce, ciphertext, header + _lp(aad))
    except (InvalidTag, ValueError):
        raise CryptoError("sealed message failed verification") from None


# --- sign / verify -------------------------------------------------------------------------------


def sign(payload: bytes, *, signing_seed: bytes, aad: bytes) -> bytes:
    header = SIGN_MAGIC + bytes((FORMAT_VERSION,))
    signature = Ed25519PrivateKey.from_private_bytes(signing_seed).sign(
        SIGN_SIG_LABEL + _lp(aad) + header + payload
    )
    return header + payload + signature


def verify(blob: bytes, *, signing_pub: bytes, aad: bytes) -> bytes:
    blob = bytes(blob)
    if len(blob) < SIGN_OVERHEAD:
        raise CryptoError("signed message is truncated")
    header = blob[:SIGN_HEADER_LEN]
    payload = blob[SIGN_HEADER_LEN:-SIG_LEN]
    signature = blob[-SIG_LEN:]
    if header[:4] != SIGN_MAGIC or header[4] != FORMAT_VERSION:
        raise CryptoError("not a signed message of a format this build speaks")
    try:
        Ed25519PublicKey.from_public_bytes(signing_pub).verify(
            signature, SIGN_SIG_LABEL + _lp(aad) + header + payload
        )
    except (InvalidSignature, ValueError):
        raise CryptoError("signed message failed verification") from None
    return payload


# --- SecAgg+ primitives (raw bytes in and out; shared.secagg owns labels and framing) -----------


def x25519_keypair() -> tuple[bytes, bytes]:
    """A fresh (secret, public) pair of raw 32-byte X25519 keys."""
    sk = X25519PrivateKey.generate()
    return sk.private_bytes_raw(), sk.public_key().public_bytes_raw()


def x25519_exchange(secret: bytes, peer_public: bytes) -> bytes:
    """The raw 32-byte X25519 shared secret; ``CryptoError`` for a malformed or small-order key."""
    try:
        return X25519PrivateKey.from_private_bytes(secret).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # wrong length, or an all-zero shared secret from a small-order point
        raise CryptoError(str(exc)) from None


def hkdf_sha256(ikm: bytes, *, length: int, salt: bytes | None, info: bytes) -> bytes:
    """RFC 5869 HKDF-SHA256 (extract then expand); ``salt=None`` is the RFC's all-zero salt."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def chacha20poly1305_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """RFC 8439 AEAD: ciphertext followed by the 16-byte tag. The caller owns nonce uniqueness."""
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def chacha20poly1305_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Inverse of ``chacha20poly1305_encrypt``; any failure (tag, key or nonce size) is ``CryptoError``."""
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, aad)
    except (InvalidTag, ValueError):
        raise CryptoError("ChaCha20-Poly1305 authentication failed") from None


# CTR counter blocks start at zero. Safe only because every key drives exactly one stream (SecAgg
# seeds are fresh per round and per purpose), so no (key, counter) pair ever repeats.
_CTR_ZERO_IV = bytes(16)


def aes256_ctr_keystream(key: bytes, n_bytes: int, *, chunk_bytes: int) -> Iterator[bytes]:
    """The first ``n_bytes`` of AES-256-CTR keystream under ``key``, yielded in slices.

    Slices are ``chunk_bytes`` long except the last, so a caller streaming a long mask holds one
    slice of keystream at a time rather than all of it.
    """
    # Checked here, not in the generator, so a bad argument fails at the call, not at first use.
    if len(key) != 32:
        raise ValueError(f"AES-256 key must be 32 bytes, got {len(key)}")
    if n_bytes < 0 or chunk_bytes < 1:
        raise ValueError(f"need n_bytes >= 0 and chunk_bytes >= 1, got {n_bytes}, {chunk_bytes}")
    return _ctr_slices(Cipher(algorithms.AES(bytes(key)), modes.CTR(_CTR_ZERO_IV)).encryptor(), n_bytes, chunk_bytes)


def _ctr_slices(enc: CipherContext, n_bytes: int, chunk_bytes: int) -> Iterator[bytes]:
    # Keystream = encryption of zeros; one zero buffer is reused (a full-length slice is no copy).
    zeros = bytes(min(chunk_bytes, n_bytes))
    for start in range(0, n_bytes, chunk_bytes):
        yield enc.update(zeros[: min(chunk_bytes, n_bytes - start)])


# --- broker TLS certificates ----------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_tls_certificates(host: str, days: int) -> tuple[bytes, bytes, bytes, bytes]:
    """Return (ca_cert_pem, ca_key_pem, server_cert_pem, server_key_pem)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    # Backdate a little so a broker and clients with slightly skewed clocks accept it at once.
    # Valid from a day before now: a device whose clock is behind (10 minutes was seen to fail
    # with "certificate is not yet valid") must still reach the broker; the window is not a secret.
    not_before = now - _dt.timedelta(days=1)
    not_after = now + _dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FL-MiniLLM broker CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        ip = ipaddress.ip_address(host)
        if ip != ipaddress.ip_address("127.0.0.1"):
            names.append(x509.IPAddress(ip))
    except ValueError:
        if host != "localhost":
            names.append(x509.DNSName(host))

    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(srv_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return ca_cert.public_bytes(pem), _pem_key(ca_key), srv_cert.public_bytes(pem), _pem_key(srv_key)


def certificate_windows(pem: bytes) -> list[tuple[float, float]]:
    """(not valid before, not valid after) as POSIX times, of each certificate in a PEM bundle."""
    return [(c.not_valid_before_utc.timestamp(), c.not_valid_after_utc.timestamp()) for c in x509.load_pem_x509_certificates(pem)]
