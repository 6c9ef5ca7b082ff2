"""Golden bytes of every message kind of protocol version 1.

If one of these fails, the wire format changed: bump ``PROTOCOL_VERSION`` and add a new fixture
directory rather than editing these. Regenerate only deliberately: ``FLM_REGEN_GOLDEN=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from shared import chunking
from shared import messages as M
from shared import tensors
from shared.secagg import messages as SA
from tests.shared.test_golden_formats import secagg_samples

DIR = Path(__file__).resolve().parents[1] / "fixtures" / f"protocol_v{M.PROTOCOL_VERSION}"
ADAPTER = tensors.pack({"l.lora_A.weight": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
                        "l.lora_B.weight": np.array([[0.5], [-0.25]], np.float32)})
LORA = M.LoraSpec(r=2, alpha=4.0, dropout=0.05, target_modules=("q_proj",))

SAMPLES: dict[str, object] = {
    "status": M.DeviceStatus(device_id="dev-1", state="training", profile="orin-nano-8gb", num_examples=42, detail="round 3"),
    "round": M.RoundSpec(round=3, participants=("dev-1", "dev-2"), local_steps=20, learning_rate=0.003, lora=LORA,
                         base_digest="0f" * 32, deadline_s=300.0, seed=12345, adapter=ADAPTER,
                         sparse=M.SparseSpec(method="topk", dim=8, k=2, seed=9, indices=b"\x01\x00\x03",
                                             value_dtype="float16"),
                         secagg=M.SecAggSpec(node_ids=(0, 1), threshold=2, graph_seed=bytes(range(32)), clip=0.125,
                                             ring_bits=16, value_bits=15, weight_norm=42, sketch_block=64)),
    "update": M.Update(round=3, device_id="dev-1", seq=7, num_examples=42, steps=20, train_loss=1.25, payload="delta",
                       base_digest="0f" * 32, tensors=ADAPTER),
    "shutdown": M.Shutdown(reason="done"),
    "release": M.Release(manifest=b"signed-manifest", files=(M.ReleaseFile("model.onnx", b"\x08\x07onnx"), M.ReleaseFile("config.json", b"{}"))),
    "sparse_update": M.SparseUpdate(round=3, device_id="dev-1", seq=8, num_examples=42, steps=20, train_loss=1.25,
                                    base_digest="0f" * 32, encoding="shared", values=bytes(range(8))),
    "masked_update": M.MaskedUpdate(round=3, device_id="dev-1", seq=9, num_examples=42, steps=20, train_loss=1.25,
                                    base_digest="0f" * 32, masked=bytes(range(16))),
    # An opaque 16-byte body: pins the envelope alone. The next case carries a real SA body; every SA
    # kind has golden bytes of its own in test_golden_formats.
    "secagg": M.SecAggMsg(round=3, device_id="dev-1", body=b"SA" + bytes(range(14))),
    "secagg_signed_advert": M.SecAggMsg(round=3, device_id="dev-1", body=SA.encode(secagg_samples()["signed_advertise"])),
    "sealed": M.Sealed(round=3, device_id="dev-1", kind="update", blob=bytes(range(64))),
    "signed": M.Signed(round=3, device_id="dev-1", kind="round", blob=bytes(range(64, 128))),
    "manifest": chunking.Manifest(xfer_id="0123456789abcdef0123456789abcdef", total_size=10, chunk_size=4, count=3,
                                  sha256=bytes(32), chunk_sha256=None),
    "chunk": chunking.Chunk(xfer_id="0123456789abcdef0123456789abcdef", seq=2, data=b"ab"),
}


def _encode(obj: object) -> bytes:
    return M.encode(obj) if isinstance(obj, M.Message) else obj.encode()  # type: ignore[attr-defined]


def _decode(kind: str, data: bytes) -> object:
    return chunking.decode_frame(data) if kind in ("manifest", "chunk") else M.decode(data)


def test_every_message_kind_has_a_fixture() -> None:
    assert set(M.KINDS) <= set(SAMPLES)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_golden_bytes(kind: str) -> None:
    path = DIR / f"{kind}.bin"
    data = _encode(SAMPLES[kind])
    if os.environ.get("FLM_REGEN_GOLDEN") == "1":
        DIR.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    assert path.exists(), f"missing golden fixture {path}; create it deliberately with FLM_REGEN_GOLDEN=1"
    golden = path.read_bytes()
    assert data == golden, f"{kind}: encoding changed"
    assert _decode(kind, golden) == SAMPLES[kind]
