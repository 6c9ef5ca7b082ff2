"""Tensors on the wire: raw little-endian buffers with a declared dtype and shape. Never pickle."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from shared.errors import SchemaError

# The dtypes we accept from the wire; anything else is rejected before numpy sees it.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int32": np.dtype("<i4"),
    "uint32": np.dtype("<u4"),
    "int64": np.dtype("<i8"),
}
MAX_DIMS = 8


@dataclass(frozen=True)
class TensorBlob:
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise SchemaError(f"tensor {self.name!r}: dtype {self.dtype!r} not in {sorted(DTYPES)}")
        if len(self.shape) > MAX_DIMS or any((not isinstance(s, int)) or s < 0 for s in self.shape):
            raise SchemaError(f"tensor {self.name!r}: bad shape {self.shape!r}")
        expected = int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize
        if len(self.data) != expected:
            raise SchemaError(
                f"tensor {self.name!r}: {len(self.data)} bytes for shape {self.shape} {self.dtype} "
                f"(expected {expected})"
            )

    def to_numpy(self) -> np.ndarray:
        """A read-only view on the buffer, in native byte order."""
        arr = np.frombuffer(self.data, dtype=DTYPES[self.dtype]).reshape(self.shape)
        return arr.astype(arr.dtype.newbyteorder("="), copy=False)

    @staticmethod
    def from_numpy(name: str, arr: np.ndarray) -> TensorBlob:
        for key, dt in DTYPES.items():
            if arr.dtype == dt or arr.dtype == dt.newbyteorder("="):
                le = np.ascontiguousarray(arr, dtype=dt)
                return TensorBlob(name=name, dtype=key, shape=tuple(int(s) for s in arr.shape), data=le.tobytes())
        raise SchemaError(f"tensor {name!r}: numpy dtype {arr.dtype} cannot go on the wire")


def pack(tensors: Mapping[str, np.ndarray]) -> tuple[TensorBlob, ...]:
    """Sorted by name so the same tensors always encode to the same bytes."""
    return tuple(TensorBlob.from_numpy(k, tensors[k]) for k in sorted(tensors))


def unpack(blobs: tuple[TensorBlob, ...]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for b in blobs:
        if b.name in out:
            raise SchemaError(f"tensor {b.name!r} appears twice")
        out[b.name] = b.to_numpy()
    return out
