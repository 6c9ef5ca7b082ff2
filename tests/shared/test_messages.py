from __future__ import annotations

import msgpack
import numpy as np
import pytest

from shared import messages as M
from shared import tensors
from shared.errors import ProtocolError, SchemaError, TruncatedError, VersionError

LORA = M.LoraSpec(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
ADAPTER = tensors.pack({"a.lora_A.weight": np.arange(8, dtype=np.float32).reshape(2, 4), "a.lora_B.weight": np.ones((4, 2), np.float32)})

SAMPLES: list[M.Message] = [
    M.DeviceStatus(device_id="dev-1", state="online", profile="cpu-dev", num_examples=12, detail=""),
    M.RoundSpec(round=3, participants=("dev-1", "dev-2"), local_steps=10, learning_rate=1e-3, lora=LORA,
                base_digest="ab" * 32, deadline_s=60.0, seed=7, adapter=ADAPTER,
                sparse=M.SparseSpec(method="dense", dim=16, k=16, seed=0, indices=b"", value_dtype="float32"), secagg=None),
    M.Update(round=3, device_id="dev-1", seq=1, num_examples=12, steps=10, train_loss=1.5, payload="delta",
             base_digest="ab" * 32, tensors=ADAPTER),
    M.Shutdown(reason="done"),
    M.RoundSpec(round=4, participants=("dev-1", "dev-2"), local_steps=10, learning_rate=1e-3, lora=LORA,
                base_digest="ab" * 32, deadline_s=60.0, seed=7, adapter=ADAPTER,
                sparse=M.SparseSpec(method="topk", dim=16, k=2, seed=3, indices=b"\x01\x02", value_dtype="float16"),
                secagg=M.SecAggSpec(node_ids=(0, 1), threshold=2, graph_seed=bytes(32), clip=0.1, ring_bits=16,
                                    value_bits=15, weight_norm=12, sketch_block=4)),
    M.SparseUpdate(round=3, device_id="dev-1", seq=2, num_examples=12, steps=10, train_loss=1.5, base_digest="ab" * 32,
                   encoding="shared", values=b"\x00" * 8),
    M.MaskedUpdate(round=3, device_id="dev-1", seq=2, num_examples=12, steps=10, train_loss=1.5, base_digest="ab" * 32,
                   masked=b"\x01" * 8),
    M.SecAggMsg(round=3, device_id="dev-1", body=b"SA\x01"),
]


def test_spec_invariants_are_checked() -> None:
    with pytest.raises(SchemaError):
        M.SparseSpec(method="dense", dim=16, k=8, seed=0, indices=b"", value_dtype="float32")
    with pytest.raises(SchemaError):
        M.SparseSpec(method="topk", dim=16, k=8, seed=0, indices=b"", value_dtype="float32")
    with pytest.raises(SchemaError):  # 3 summands of 16-bit values wrap a 16-bit ring
        M.SecAggSpec(node_ids=(0, 1, 2), threshold=2, graph_seed=bytes(32), clip=0.1, ring_bits=16, value_bits=16,
                     weight_norm=1, sketch_block=0)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.KIND)
def test_round_trip(msg: M.Message) -> None:
    data = M.encode(msg)
    assert M.decode(data) == msg
    assert M.decode(data, expect=type(msg)) == msg
    assert M.encode(M.decode(data)) == data  # deterministic bytes


def test_tensor_values_survive() -> None:
    up = M.decode(M.encode(SAMPLES[2]))
    assert isinstance(up, M.Update)
    arrs = tensors.unpack(up.tensors)
    np.testing.assert_array_equal(arrs["a.lora_A.weight"], np.arange(8, dtype=np.float32).reshape(2, 4))


def _env(**over: object) -> bytes:
    env = msgpack.unpackb(M.encode(SAMPLES[2]), raw=False)
    env.update(over)
    return msgpack.packb(env, use_bin_type=True)


def _body(**over: object) -> bytes:
    env = msgpack.unpackb(M.encode(SAMPLES[2]), raw=False)
    env["b"].update(over)
    return msgpack.packb(env, use_bin_type=True)


def test_wrong_version_is_a_version_error() -> None:
    with pytest.raises(VersionError, match="protocol version 2"):
        M.decode(_env(v=2))


@pytest.mark.parametrize(("data", "match"), [
    (_env(k="nope"), "unknown message kind"),
    (_body(extra=1), "unknown field"),
    (_body(round="3"), "expected int"),
    (_body(train_loss=True), "expected float"),
    (_body(payload="weights"), "not one of"),
    (_body(tensors=[{"name": "x", "dtype": "float64", "shape": [1], "data": b"\0" * 8}]), "dtype"),
    (_body(tensors=[{"name": "x", "dtype": "float32", "shape": [3], "data": b"\0" * 8}]), "expected 12"),
    (msgpack.packb([1, 2, 3]), "envelope"),
    (b"\xc1garbage", "msgpack"),
])
def test_bad_schema_is_a_schema_error(data: bytes, match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        M.decode(data)


def test_missing_field() -> None:
    env = msgpack.unpackb(M.encode(SAMPLES[2]), raw=False)
    del env["b"]["seq"]
    with pytest.raises(SchemaError, match="missing field"):
        M.decode(msgpack.packb(env, use_bin_type=True))


def test_expect_other_kind() -> None:
    with pytest.raises(SchemaError, match="expected a 'update'"):
        M.decode(M.encode(SAMPLES[0]), expect=M.Update)


def test_every_truncation_is_rejected_with_a_typed_error() -> None:
    data = M.encode(SAMPLES[1])
    kinds = set()
    for n in range(len(data)):
        with pytest.raises(ProtocolError) as ei:
            M.decode(data[:n])
        kinds.add(type(ei.value))
    assert TruncatedError in kinds
    assert kinds <= {TruncatedError, SchemaError}


def test_trailing_bytes_rejected() -> None:
    with pytest.raises(SchemaError, match="trailing"):
        M.decode(M.encode(SAMPLES[0]) + b"\x00")


def _scoring(b: int = 2, n: int = 3, k: int = 4, p: int = 5) -> M.ScoringSpec:
    return M.ScoringSpec(rollouts=b, positions=n, k=k, prompt_len=p, tensors=tensors.pack({
        "ids": np.arange(b * (p + n), dtype=np.int32).reshape(b, p + n),
        "candidates": np.zeros((b, n, k), np.int32), "mask": np.ones((b, n), np.uint8)}))


def test_a_scoring_round_spec_round_trips_and_needs_secure_aggregation() -> None:
    base = SAMPLES[4]
    assert isinstance(base, M.RoundSpec) and base.secagg is not None
    from dataclasses import replace

    spec = replace(base, scoring=_scoring())
    back = M.decode(M.encode(spec))
    assert back == spec and back.scoring is not None and back.scoring.values == 2 * 3 * 5
    # Without a scoring spec the field is absent on the wire: v1 bytes unchanged (test_golden).
    assert b"scoring" not in M.encode(base) and b"scoring" in M.encode(spec)
    with pytest.raises(SchemaError, match="needs secure aggregation"):
        replace(SAMPLES[1], scoring=_scoring())
    with pytest.raises(SchemaError, match="do not match"):  # candidates of the wrong shape
        M.ScoringSpec(rollouts=2, positions=3, k=4, prompt_len=5, tensors=tensors.pack({
            "ids": np.zeros((2, 8), np.int32), "candidates": np.zeros((2, 3, 5), np.int32), "mask": np.ones((2, 3), np.uint8)}))
    with pytest.raises(SchemaError, match="exceed"):
        M.ScoringSpec(rollouts=1 << 12, positions=1 << 8, k=15, prompt_len=1, tensors=())
