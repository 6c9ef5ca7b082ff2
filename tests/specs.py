"""Round specs for tests that drive the aggregator without running a whole round."""

from __future__ import annotations

import numpy as np

from shared import messages as M
from shared import tensors


def dense_spec(rnd: int, participants: list[str], dim: int, digest: str = "ab" * 32) -> M.RoundSpec:
    """A FedIT round (secure aggregation off, dense fp32) over a single tensor ``w`` of ``dim`` values."""
    return M.RoundSpec(round=rnd, participants=tuple(participants), local_steps=1, learning_rate=1e-3,
                       lora=M.LoraSpec(r=1, alpha=1.0, dropout=0.0, target_modules=("q_proj",)), base_digest=digest,
                       deadline_s=60.0, seed=0, adapter=tensors.pack({"w": np.zeros(dim, np.float32)}),
                       sparse=M.SparseSpec(method="dense", dim=dim, k=dim, seed=0, indices=b"", value_dtype="float32"),
                       secagg=None)
