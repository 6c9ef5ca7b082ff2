"""The SecAgg+ stage driver: advertise keys, share keys, masked inputs, unmask; the mean only.

Masked vectors are folded into one running sum as they arrive and never stored; only the
unmasked sum of the survivors exists, and only if at least t survive. What comes out is the
weighted mean delta (and, for global top-k, the fleet's summed magnitude sketch).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from aggregator.collect import Collector, RoundBook
from aggregator.strategy import Reply
from shared import messages as M
from shared import secagg, sparse, update_codec
from shared.errors import ReplayError, SchemaError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecureResult:
    mean: dict[str, np.ndarray]  # weighted mean delta of the contributors, adapter-shaped
    contributors: list[str]
    sketch: np.ndarray | None  # summed per-coordinate magnitude sketch / weight (global top-k)


def fold_masked(b: RoundBook, device: str, up: M.MaskedUpdate) -> Reply:
    """Add a masked vector to the running sum and forget it: no individual vector is kept."""
    assert b.spec is not None and b.spec.secagg is not None
    if b.stage != "update" or b.sa is None:
        raise ReplayError(f"masked update from {device} outside the masked-input stage ({b.stage})")
    sa, k = b.spec.secagg, update_codec.secagg_dim(b.spec.sparse, b.spec.secagg)
    if len(up.masked) != sparse.ring_bytes(k, sa.ring_bits):
        raise SchemaError(f"masked update from {device} has {len(up.masked)} bytes, expected "
                          f"{sparse.ring_bytes(k, sa.ring_bits)}")
    node = b.node_of[device]
    if node not in b.sa.u2:
        raise ReplayError(f"{device} did not finish the key exchange of round {b.rnd}")
    y = sparse.unpack_ring(up.masked, sa.ring_bits, k)
    b.sa = secagg.server_add_masked(b.sa, secagg.MaskedInput(b.rnd, node, y.astype("<u4", copy=False).tobytes()))
    return Reply(device, up.num_examples, {})


def _relay(col: Collector, b: RoundBook, out: dict[int, object]) -> None:
    dev_of = {n: d for d, n in b.node_of.items()}
    for node, msg in out.items():
        col.send_to(dev_of[node], "secagg", M.SecAggMsg(round=b.rnd, device_id=dev_of[node], body=secagg.encode(msg)))  # type: ignore[arg-type]


def run(col: Collector, b: RoundBook, layout: sparse.Layout, key_timeout_s: float, quorum: int) -> SecureResult | None:
    """Stages 0-3 of SecAgg+; None below quorum. Raises SecAggAbort below the threshold."""
    assert b.spec is not None and b.spec.secagg is not None and b.idx is not None
    spec, sa = b.spec, b.spec.secagg
    b.node_of = dict(zip(spec.participants, sa.node_ids))
    dev_of = {n: d for d, n in b.node_of.items()}
    params = secagg.SecAggParams(round_id=b.rnd, node_ids=sa.node_ids, threshold=sa.threshold,
                                 dim=update_codec.secagg_dim(spec.sparse, sa), graph_seed=sa.graph_seed)
    b.sa = secagg.server_init(params)
    b.accept = lambda device, up: fold_masked(b, device, up)
    got = col.collect("advertise", set(spec.participants), key_timeout_s)
    b.sa, out = secagg.server_collect_keys(b.sa, got.values())
    _relay(col, b, out)
    got = col.collect("share", {dev_of[u] for u in out}, key_timeout_s)
    b.sa, out = secagg.server_collect_shares(b.sa, got.values())
    _relay(col, b, out)
    col.collect("update", {dev_of[u] for u in b.sa.u2}, b.deadline - time.monotonic())
    if len(b.replies) < quorum:
        return None
    b.sa, req = secagg.server_request_unmask(b.sa)
    _relay(col, b, {u: secagg.unmask_request_for(req, u) for u in b.sa.u3})
    got = col.collect("unmask", {dev_of[u] for u in b.sa.u3}, key_timeout_s)
    res = secagg.server_unmask(b.sa, got.values())
    b.sa = None  # the accumulator now holds the sum; nothing else about single devices remains
    contributors = [dev_of[u] for u in res.contributors]
    total = update_codec.reduce_ring(res.total, sa.ring_bits)
    summed = secagg.dequantize_sum(total, update_codec.quant_config(sa), len(contributors))
    weight = sum(update_codec.weight(b.replies[d].num_examples, sa.weight_norm) for d in contributors)
    k = spec.sparse.k
    sketch = None
    if sa.sketch_block:
        # Where the fleet's unsent mass is (a sum over devices, like everything else we learn).
        sketch = update_codec.expand_blocks(summed[k:] / weight, sa.sketch_block, spec.sparse.dim)
    mean = sparse.scatter((summed[:k] / weight).astype(np.float32), b.idx, spec.sparse.dim)
    b.received = contributors
    return SecureResult(sparse.unflatten(mean, layout), contributors, sketch)
