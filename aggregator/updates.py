"""Decode one plain (not securely aggregated) update into adapter-shaped deltas, or refuse it."""

from __future__ import annotations

import numpy as np

from shared import messages as M
from shared import sparse, tensors, update_codec
from shared.errors import SchemaError

Tensors = dict[str, np.ndarray]


def clip(delta: Tensors, bound: float) -> tuple[Tensors, int]:
    """Every value to [-bound, bound], as a secure round's devices clip theirs; and how many moved.

    A plain round's update is seen in the clear, so it is bounded here: before, values of 3e38
    passed (only finiteness was checked) and, with a claimed example count of 2^31 - 1, owned the mean."""
    out, moved = {}, 0
    for k, v in delta.items():
        moved += int(np.count_nonzero(np.abs(v) > bound))
        out[k] = np.clip(v, -bound, bound)
    return out, moved


def dense_delta(device: str, up: M.Update, global_state: Tensors) -> Tensors:
    delta = tensors.unpack(up.tensors)
    if set(delta) != set(global_state):
        raise SchemaError(f"update from {device} has {len(delta)} tensors, expected the {len(global_state)} of the adapter")
    for k, v in delta.items():
        if v.shape != global_state[k].shape or v.dtype != np.float32:
            raise SchemaError(f"update from {device}: tensor {k} is {v.dtype}{v.shape}, expected float32{global_state[k].shape}")
        if not np.isfinite(v).all():
            raise SchemaError(f"update from {device}: tensor {k} has non-finite values")
    return delta


def sparse_delta(device: str, up: M.SparseUpdate, sp: M.SparseSpec, idx: np.ndarray | None, layout: sparse.Layout) -> Tensors:
    if up.encoding == "topk":
        if sp.method != "device_topk":
            raise SchemaError(f"{device} sent its own top-k in a round with a shared index set")
        got, vals = sparse.topk_decode(up.values, sp.dim)
        if len(got) > sp.k:
            raise SchemaError(f"{device} sent {len(got)} coordinates, the round allows {sp.k}")
        if not np.isfinite(vals).all():
            raise SchemaError(f"update from {device} has non-finite values")
        idx = got
    else:
        if idx is None:
            raise SchemaError(f"{device} sent shared-index values in a device_topk round")
        vals = update_codec.decode_values(up.values, sp.value_dtype, len(idx))
    return sparse.unflatten(sparse.scatter(vals, idx, sp.dim), layout)
