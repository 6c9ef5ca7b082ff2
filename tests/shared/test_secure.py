"""Sealed/signed envelopes: what the receiver accepts, and every way it refuses (replay, tamper)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from shared import messages as M
from shared import secure, tensors
from shared.crypto import CryptoError, generate_keys
from shared.errors import ReplayError, SchemaError

AGG = generate_keys()
DEV_A = generate_keys()
DEV_B = generate_keys()
VEC = np.arange(64, dtype=np.float32) * 0.37
UPDATE = M.Update(round=5, device_id="dev-a", seq=1, num_examples=10, steps=3, train_loss=1.0, payload="delta",
                  base_digest="cd" * 32, tensors=tensors.pack({"w": VEC}))


def _round(expected: int):
    def check(r: int) -> None:
        if r != expected:
            raise ReplayError(f"round {r} is not {expected}")
    return check


def _open(data: bytes, device: str = "dev-a", rnd: int = 5, sender=DEV_A, recipient=AGG) -> M.Message:
    return secure.open_message(data, M.Update, device_id=device, check_round=_round(rnd), recipient=recipient,
                               sender=sender.public, sealed=True)


def _sealed(msg: M.Message = UPDATE, device: str = "dev-a", rnd: int = 5, sender=DEV_A) -> bytes:
    return secure.seal_message(msg, round=rnd, device_id=device, sender=sender, recipient=AGG.public)


def test_sealed_update_round_trip_and_no_plaintext_on_the_wire() -> None:
    data = _sealed()
    assert _open(data) == UPDATE
    assert VEC.tobytes()[:32] not in data
    assert UPDATE.base_digest.encode() not in data


def test_replay_past_round_is_rejected() -> None:
    with pytest.raises(ReplayError, match="round 5 is not 6"):
        _open(_sealed(), rnd=6)


def test_replay_on_another_devices_topic_is_rejected() -> None:
    # A's message published on B's topic: the clear header names A.
    with pytest.raises(ReplayError, match="dev-a"):
        _open(_sealed(), device="dev-b", sender=DEV_B)


def test_replay_tamper_forged_header_fails_authentication() -> None:
    env = msgpack.unpackb(_sealed(), raw=False)
    for field, value in (("device_id", "dev-b"), ("round", 6), ("kind", "status")):
        forged = msgpack.packb({**env, "b": {**env["b"], field: value}}, use_bin_type=True)
        with pytest.raises((CryptoError, SchemaError, ReplayError)):
            _open(forged, device=env["b"]["device_id"] if field != "device_id" else "dev-b",
                  rnd=6 if field == "round" else 5, sender=DEV_B if field == "device_id" else DEV_A)


def test_tamper_header_device_forged_with_right_sender_key_still_fails() -> None:
    env = msgpack.unpackb(_sealed(), raw=False)
    forged = msgpack.packb({**env, "b": {**env["b"], "device_id": "dev-b"}}, use_bin_type=True)
    with pytest.raises(CryptoError):
        _open(forged, device="dev-b", sender=DEV_A)  # even knowing A sealed it, B's AAD does not open it


def test_tamper_inner_outer_mismatch_is_rejected() -> None:
    other = M.Update(**{**UPDATE.__dict__, "round": 4})
    with pytest.raises(ReplayError, match="inner round 4"):
        _open(_sealed(other))


@pytest.mark.parametrize("pos", [10, 40, -70, -1])
def test_tamper_flipped_bit_fails(pos: int) -> None:
    data = bytearray(_sealed())
    data[pos] ^= 0x01
    with pytest.raises((CryptoError, SchemaError)):
        _open(bytes(data))


def test_tamper_wrong_keys_fail() -> None:
    with pytest.raises(CryptoError):
        _open(_sealed(), recipient=DEV_B)  # not the aggregator's key
    with pytest.raises(CryptoError):
        _open(_sealed(sender=DEV_B))  # sealed by B, claimed as A


def test_bare_message_refused_when_security_is_on() -> None:
    with pytest.raises(SchemaError, match="bare 'update' message refused"):
        secure.peek(M.encode(UPDATE))
    with pytest.raises(SchemaError, match="expected a 'sealed' envelope"):
        _open(M.encode(UPDATE))


def test_signed_announcement_verifies_and_binds_the_device() -> None:
    spec = M.Shutdown(reason="x")
    data = secure.sign_message(spec, round=3, device_id="dev-a", key=AGG)
    assert secure.open_message(data, M.Shutdown, device_id="dev-a", check_round=_round(3), recipient=None,
                               sender=AGG.public, sealed=False) == spec
    with pytest.raises(ReplayError):  # sent to A, replayed to B
        secure.open_message(data, M.Shutdown, device_id="dev-b", check_round=_round(3), recipient=None,
                            sender=AGG.public, sealed=False)
    with pytest.raises(CryptoError):  # not signed by the pinned aggregator key
        secure.open_message(secure.sign_message(spec, round=3, device_id="dev-a", key=DEV_A), M.Shutdown,
                            device_id="dev-a", check_round=_round(3), recipient=None, sender=AGG.public, sealed=False)
