"""shared.crypto: round trips, known-answer vectors, tampering, wrong keys, key files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shared import _hazmat, crypto
from shared.crypto import (
    BROADCAST,
    SEAL_OVERHEAD,
    AssociatedData,
    CryptoError,
    DeviceKeys,
    KeyFilePermissionError,
    PublicKeys,
)
from shared.errors import ProtocolError, SchemaError

# Fixed keys for the known-answer vectors (never use such keys for anything else).
DEV = DeviceKeys(signing_seed=bytes(range(32)), encryption_secret=bytes(range(32, 64)))
AGG = DeviceKeys(signing_seed=bytes(range(64, 96)), encryption_secret=bytes(range(96, 128)))
EPHEMERAL = bytes([0x42]) * 32
AAD = AssociatedData(round=7, device_id="dev-01", kind="update")
PLAINTEXT = b"hello federated world"

GOLDEN_AAD = "666c6d2f6161642f76310001000000000000000700066465762d30310006757064617465"
GOLDEN_DEV_SIGNING_PUB = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
GOLDEN_DEV_ENCRYPTION_PUB = "358072d6365880d1aeea329adf9121383851ed21a28e3b75e965d0d2cd166254"
GOLDEN_SEALED = (
    "464c4d730101132c442be010fbd57e72603328aa76e71fccc1503aae219327d14d9c9993f47253d8b35ad28185"
    "bdcd5d6bbac29737b686b654871b922b2f03133e0ce47b58c5c29e2938dd30286063ce12b23210a8c7a092113a"
    "220cc28f93c49c7602bfeb9f54ecc148c8baa06225ae59d130dba52e0abfca80e34999b03e229894d8419b2912"
    "1b349805"
)
GOLDEN_SIGNED = (
    "464c4d6701726f756e642037206f70656ece9c283cf0674ee10bb48555c74ec1305f946c699e51581959b86e61"
    "84fb5180ba14007cc8bd3e761aba031a79b10aef2deb5d5dc964f1bd9c7350d820ca210f"
)
SIGNED_AAD = AssociatedData(round=7, device_id=BROADCAST, kind="announce")


def _sealed() -> bytes:
    return crypto.seal(PLAINTEXT, recipient=AGG.public, sender=DEV, aad=AAD)


def _flip(blob: bytes, pos: int, mask: int = 0x01) -> bytes:
    b = bytearray(blob)
    b[pos] ^= mask
    return bytes(b)


# --- round trips ----------------------------------------------------------------------------------


def test_seal_open_round_trip_with_generated_keys() -> None:
    dev, agg = crypto.generate_device_keys(), crypto.generate_keys()
    for size in (0, 1, 1000, 1 << 20):
        msg = os.urandom(size)
        blob = crypto.seal(msg, recipient=agg.public, sender=dev, aad=AAD)
        assert len(blob) == size + SEAL_OVERHEAD
        assert crypto.open_sealed(blob, recipient=agg, sender=dev.public, aad=AAD) == msg


def test_seal_is_randomized_per_message() -> None:
    # A fresh ephemeral key per message: the same plaintext never gives the same bytes.
    assert _sealed() != _sealed()


def test_sign_verify_round_trip() -> None:
    blob = crypto.sign(b"release 3", AGG, aad=SIGNED_AAD)
    assert crypto.verify(blob, AGG.public, aad=SIGNED_AAD) == b"release 3"
    assert crypto.verify(crypto.sign(b"", AGG, aad=SIGNED_AAD), AGG.public, aad=SIGNED_AAD) == b""


def test_ciphertext_does_not_contain_plaintext() -> None:
    msg = b"SECRET-LORA-DELTA-" * 64
    blob = crypto.seal(msg, recipient=AGG.public, sender=DEV, aad=AAD)
    assert msg not in blob
    assert b"SECRET-LORA-DELTA-" not in blob


# --- known-answer vectors -------------------------------------------------------------------------


def test_known_answer_aad_encoding() -> None:
    assert AAD.encode().hex() == GOLDEN_AAD


def test_known_answer_public_keys() -> None:
    assert DEV.public.signing.hex() == GOLDEN_DEV_SIGNING_PUB
    assert DEV.public.encryption.hex() == GOLDEN_DEV_ENCRYPTION_PUB


def test_known_answer_seal_vector() -> None:
    # Fixed keys + fixed ephemeral => fixed bytes (Ed25519 is deterministic). A change here is a
    # wire-format change: bump _hazmat.FORMAT_VERSION rather than updating the golden.
    blob = _hazmat.seal(
        PLAINTEXT,
        recipient_enc_pub=AGG.public.encryption,
        sender_signing_seed=DEV.signing_seed,
        aad=AAD.encode(),
        ephemeral_secret=EPHEMERAL,
    )
    assert blob.hex() == GOLDEN_SEALED
    assert crypto.open_sealed(bytes.fromhex(GOLDEN_SEALED), recipient=AGG, sender=DEV.public, aad=AAD) == PLAINTEXT


def test_known_answer_sign_vector() -> None:
    assert crypto.sign(b"round 7 open", AGG, aad=SIGNED_AAD).hex() == GOLDEN_SIGNED
    assert crypto.verify(bytes.fromhex(GOLDEN_SIGNED), AGG.public, aad=SIGNED_AAD) == b"round 7 open"


# --- tampering (pytest -k tamper) -------------------------------------------------------------------

_HDR = _hazmat.SEAL_HEADER_LEN
_SIG = _hazmat.SIG_LEN
_TAG = _hazmat.TAG_LEN


def _region_positions(blob: bytes) -> dict[str, list[int]]:
    n = len(blob)
    return {
        "magic": list(range(0, 4)),
        "version_suite": [4, 5],
        "ephemeral_key": list(range(6, _HDR)),
        "ciphertext": list(range(_HDR, n - _SIG - _TAG)),
        "tag": list(range(n - _SIG - _TAG, n - _SIG)),
        "signature": list(range(n - _SIG, n)),
    }


@pytest.mark.parametrize("region", ["magic", "version_suite", "ephemeral_key", "ciphertext", "tag", "signature"])
def test_tamper_seal_flipped_bit_in_every_byte_of_region(region: str) -> None:
    blob = _sealed()
    positions = _region_positions(blob)[region]
    assert positions
    for pos in positions:
        for mask in (0x01, 0x80):
            with pytest.raises(CryptoError):
                crypto.open_sealed(_flip(blob, pos, mask), recipient=AGG, sender=DEV.public, aad=AAD)


def test_tamper_seal_regions_cover_whole_blob() -> None:
    blob = _sealed()
    covered = sorted(p for ps in _region_positions(blob).values() for p in ps)
    assert covered == list(range(len(blob)))


def test_tamper_seal_truncated_and_extended() -> None:
    blob = _sealed()
    for cut in (0, 1, _HDR, _HDR + 5, len(blob) - _SIG, len(blob) - 1):
        with pytest.raises(CryptoError):
            crypto.open_sealed(blob[:cut], recipient=AGG, sender=DEV.public, aad=AAD)
    with pytest.raises(CryptoError):
        crypto.open_sealed(blob + b"\x00", recipient=AGG, sender=DEV.public, aad=AAD)
    with pytest.raises(CryptoError):
        crypto.open_sealed(b"", recipient=AGG, sender=DEV.public, aad=AAD)


@pytest.mark.parametrize(
    "other",
    [
        AssociatedData(round=8, device_id="dev-01", kind="update"),
        AssociatedData(round=7, device_id="dev-02", kind="update"),
        AssociatedData(round=7, device_id="dev-01", kind="status"),
        AssociatedData(round=7, device_id="dev-01", kind="update", protocol_version=2),
        AssociatedData(round=7, device_id=BROADCAST, kind="update"),
    ],
    ids=["other_round", "other_device", "other_kind", "other_version", "broadcast"],
)
def test_tamper_replay_under_other_aad(other: AssociatedData) -> None:
    blob = _sealed()
    with pytest.raises(CryptoError):
        crypto.open_sealed(blob, recipient=AGG, sender=DEV.public, aad=other)
    signed = crypto.sign(b"x", AGG, aad=AAD)
    with pytest.raises(CryptoError):
        crypto.verify(signed, AGG.public, aad=other)


def test_tamper_wrong_keys() -> None:
    blob = _sealed()
    stranger = crypto.generate_keys()
    with pytest.raises(CryptoError):  # not the recipient
        crypto.open_sealed(blob, recipient=stranger, sender=DEV.public, aad=AAD)
    with pytest.raises(CryptoError):  # claimed sender did not sign it
        crypto.open_sealed(blob, recipient=AGG, sender=stranger.public, aad=AAD)
    # A stranger who knows the aggregator's public key can encrypt, but not sign as DEV.
    forged = crypto.seal(PLAINTEXT, recipient=AGG.public, sender=stranger, aad=AAD)
    with pytest.raises(CryptoError):
        crypto.open_sealed(forged, recipient=AGG, sender=DEV.public, aad=AAD)
    with pytest.raises(CryptoError):
        crypto.verify(crypto.sign(b"x", stranger, aad=AAD), AGG.public, aad=AAD)


def test_tamper_resigned_ciphertext_swap() -> None:
    # An attacker re-signs DEV's ciphertext under its own key: verification is per sender, and the
    # KDF binds the sender's signing key, so it neither verifies as DEV nor decrypts as the stranger.
    stranger = crypto.generate_keys()
    blob = _sealed()
    body = blob[:-_SIG]
    resigned = body + crypto.sign(b"", stranger, aad=AAD)[-_SIG:]
    for sender in (DEV.public, stranger.public):
        with pytest.raises(CryptoError):
            crypto.open_sealed(resigned, recipient=AGG, sender=sender, aad=AAD)


def test_tamper_signed_message_every_byte() -> None:
    blob = crypto.sign(b"release 3 digest", AGG, aad=SIGNED_AAD)
    for pos in range(len(blob)):
        with pytest.raises(CryptoError):
            crypto.verify(_flip(blob, pos), AGG.public, aad=SIGNED_AAD)
    for cut in range(len(blob)):
        with pytest.raises(CryptoError):
            crypto.verify(blob[:cut], AGG.public, aad=SIGNED_AAD)


def test_tamper_sealed_blob_is_not_a_signed_blob() -> None:
    # The two formats have distinct magic and signature labels: neither passes as the other.
    with pytest.raises(CryptoError):
        crypto.verify(_sealed(), DEV.public, aad=AAD)
    with pytest.raises(CryptoError):
        crypto.open_sealed(crypto.sign(b"x" * 200, DEV, aad=AAD), recipient=AGG, sender=DEV.public, aad=AAD)


def test_tamper_non_bytes_input_is_crypto_error() -> None:
    with pytest.raises(CryptoError):
        crypto.open_sealed("text", recipient=AGG, sender=DEV.public, aad=AAD)  # type: ignore[arg-type]


def test_crypto_error_is_a_protocol_error() -> None:
    assert issubclass(CryptoError, ProtocolError)
    assert crypto.CryptoError is _hazmat.CryptoError


# --- associated data -----------------------------------------------------------------------------


def test_associated_data_is_validated_and_unambiguous() -> None:
    with pytest.raises(ValueError):
        AssociatedData(round=-1, device_id="d", kind="update")
    with pytest.raises(ValueError):
        AssociatedData(round=1, device_id="a/b", kind="update")
    with pytest.raises(ValueError):
        AssociatedData(round=1, device_id="d", kind="Bad Kind")
    with pytest.raises(TypeError):
        AssociatedData(round=True, device_id="d", kind="update")
    # Length prefixes: moving characters between fields changes the encoding.
    a = AssociatedData(round=1, device_id="ab", kind="c")
    b = AssociatedData(round=1, device_id="a", kind="bc")
    assert a.encode() != b.encode()


# --- key files -----------------------------------------------------------------------------------


def test_private_key_file_is_0600_and_round_trips(tmp_path: Path) -> None:
    keys = crypto.generate_keys()
    old = os.umask(0o000)  # even a permissive umask must not widen the key file
    try:
        path = crypto.save_private_keys(keys, tmp_path / "device.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = crypto.load_private_keys(path)
    assert loaded.public == keys.public
    assert loaded.signing_seed == keys.signing_seed and loaded.encryption_secret == keys.encryption_secret
    assert "signing_seed" not in repr(loaded)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    with pytest.raises(FileExistsError):
        crypto.save_private_keys(keys, path)
    keys.save(path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o610])
def test_private_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = crypto.save_private_keys(crypto.generate_keys(), tmp_path / "device.key")
    os.chmod(path, mode)
    with pytest.raises(KeyFilePermissionError, match="chmod 600"):
        crypto.load_private_keys(path)


def test_public_key_file_round_trip_and_strict(tmp_path: Path) -> None:
    pub = crypto.generate_keys().public
    path = crypto.save_public_keys(pub, tmp_path / "device.pub.json")
    assert crypto.load_public_keys(path) == pub
    assert pub.fingerprint() == crypto.load_public_keys(path).fingerprint()
    good = path.read_text()
    for bad in (
        "not json",
        "[]",
        good.replace("flm-public-keys", "flm-private-keys"),
        good.replace('"version": 1', '"version": 2'),
        good.replace('"format"', '"extra": 1, "format"'),
    ):
        assert bad != good
        with pytest.raises(SchemaError):
            PublicKeys.from_json(bad)
    import json

    obj = json.loads(good)
    obj["signing_ed25519"] = "AAAA"
    with pytest.raises(SchemaError):
        PublicKeys.from_json(json.dumps(obj))
    obj["signing_ed25519"] = "!!not base64!!"
    with pytest.raises(SchemaError):
        PublicKeys.from_json(json.dumps(obj))


def test_private_file_is_not_a_public_file(tmp_path: Path) -> None:
    path = crypto.save_private_keys(crypto.generate_keys(), tmp_path / "k")
    with pytest.raises(SchemaError):
        crypto.load_public_keys(path)


def test_make_server_tls_certificates() -> None:
    import ipaddress

    from cryptography import x509

    material = crypto.make_server_tls("broker.example", days=2)
    assert "key_pem" not in repr(material)
    ca = x509.load_pem_x509_certificate(material.ca_cert_pem)
    srv = x509.load_pem_x509_certificate(material.server_cert_pem)
    assert srv.issuer == ca.subject
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "broker.example"}
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    srv.verify_directly_issued_by(ca)
    assert b"PRIVATE KEY" in material.server_key_pem and b"PRIVATE KEY" in material.ca_key_pem
