"""The SecAgg+ stage driver, hardened (``shared.secagg.hardened``): signed adverts, share keys,
bundle receipts, masked inputs, the consistency check, unmask; the mean only.

Masked vectors are folded into one running sum as they arrive and never stored; only the
unmasked sum of the survivors exists, and only if at least t survive. What comes out is the
weighted mean delta (and, for global top-k, the fleet's summed magnitude sketch).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from aggregator.collect import Collector, RoundBook
from aggregator.strategy import Reply
from shared import messages as M
from shared import secagg, sparse, update_codec
from shared.errors import ProtocolError, ReplayError, SchemaError
from shared.secagg import hardened

log = logging.getLogger(__name__)


class AggregateRejected(ProtocolError):
    """The unmasked aggregate fails its bounds check: the round is dropped, the model kept."""


@dataclass(frozen=True)
class SecureResult:
    mean: dict[str, np.ndarray]  # weighted mean delta of the contributors, adapter-shaped
    contributors: list[str]
    sketch: np.ndarray | None  # summed per-coordinate magnitude sketch / weight (global top-k)
    train_loss: float  # the contributors' weighted mean training loss (from the masked tail)
    scores: np.ndarray | None = None  # fl-minillm client-teacher rounds: the fleet's weighted mean scoring vector


def fold_masked(b: RoundBook, device: str, up: M.MaskedUpdate) -> Reply:
    """Add a masked vector to the running sum and forget it: no individual vector is kept."""
    assert b.spec is not None and b.spec.secagg is not None
    if b.stage != "update" or b.sa is None:
        raise ReplayError(f"masked update from {device} outside the masked-input stage ({b.stage})")
    sa, k = b.spec.secagg, update_codec.secagg_dim(b.spec.sparse, b.spec.secagg, b.spec.scoring)
    if len(up.masked) != sparse.ring_bytes(k, sa.ring_bits):
        raise SchemaError(f"masked update from {device} has {len(up.masked)} bytes, expected "
                          f"{sparse.ring_bytes(k, sa.ring_bits)}")
    node = b.node_of[device]
    if node not in b.sa.inner.u2:
        raise ReplayError(f"{device} did not finish the key exchange of round {b.rnd}")
    y = sparse.unpack_ring(up.masked, sa.ring_bits, k)
    b.sa = hardened.server_add_masked(b.sa, secagg.MaskedInput(b.rnd, node, y.astype("<u4", copy=False).tobytes()))
    return Reply(device, up.num_examples, {})


def _relay(col: Collector, b: RoundBook, out: dict[int, object]) -> None:
    dev_of = {n: d for d, n in b.node_of.items()}
    for node, msg in out.items():
        col.send_to(dev_of[node], "secagg", M.SecAggMsg(round=b.rnd, device_id=dev_of[node], body=secagg.encode(msg)))  # type: ignore[arg-type]


def run(col: Collector, b: RoundBook, layout: sparse.Layout, key_timeout_s: float, quorum: int,
        authority: Any, certs: Mapping[str, bytes]) -> SecureResult | None:
    """The SecAgg+ stages; None below quorum. Raises SecAggAbort below the threshold.

    With ``authority`` (the fleet authority's public key; ``certs`` the enrolled devices'
    certificates, which adverts must carry byte for byte) the round is hardened against an
    aggregator that deviates. Without it (``insecure`` configs only) it is the semi-honest round.
    """
    assert b.spec is not None and b.spec.secagg is not None and b.idx is not None
    spec, sa = b.spec, b.spec.secagg
    b.node_of = dict(zip(spec.participants, sa.node_ids))
    dev_of = {n: d for d, n in b.node_of.items()}
    params = secagg.SecAggParams(round_id=b.rnd, node_ids=sa.node_ids, threshold=sa.threshold,
                                 dim=update_codec.secagg_dim(spec.sparse, sa, spec.scoring), graph_seed=sa.graph_seed)
    b.accept = lambda device, up: fold_masked(b, device, up)
    if authority is None:
        b.hardened = False
        b.sa = hardened.HardenedServer(secagg.server_init(params))
        got = col.collect("advertise", set(spec.participants), key_timeout_s)
        inner, keys = secagg.server_collect_keys(b.sa.inner, got.values())
        b.sa = replace(b.sa, inner=inner)
        _relay(col, b, keys)
    else:
        b.sa = hardened.server_init(params)
        got = col.collect("advertise", set(spec.participants), key_timeout_s)
        b.sa, keys = hardened.server_collect_adverts(b.sa, got.values(), hardened.Identity(dev_of, authority), certs)
        _relay(col, b, keys)
    got = col.collect("share", {dev_of[u] for u in keys}, key_timeout_s)
    b.sa, out = hardened.server_collect_shares(b.sa, got.values())
    _relay(col, b, out)
    if authority is not None:
        # Receipts come back before the devices train: a neighbour whose bundle did not open is
        # cut from the graph now, so it costs its own edges, not everyone's round.
        got = col.collect("receipt", {dev_of[u] for u in b.sa.inner.u2}, key_timeout_s)
        b.sa, peers = hardened.server_collect_receipts(b.sa, got.values())
        _relay(col, b, peers)
    col.collect("update", {dev_of[u] for u in b.sa.inner.u2}, b.deadline - time.monotonic())
    if len(b.replies) < quorum:
        return None
    if authority is None:
        inner, req = secagg.server_request_unmask(b.sa.inner)
        b.sa = replace(b.sa, inner=inner)
        asked = {u: secagg.unmask_request_for(req, u) for u in inner.u3}
    else:
        b.sa, creq = hardened.server_request_consistency(b.sa)
        _relay(col, b, creq)
        got = col.collect("consistency", {dev_of[u] for u in creq}, key_timeout_s)
        b.sa, asked = hardened.server_collect_consistency(b.sa, got.values())  # type: ignore[assignment]
    _relay(col, b, asked)
    got = col.collect("unmask", {dev_of[u] for u in asked}, key_timeout_s)
    res = hardened.server_unmask(b.sa, got.values())
    b.sa = None  # the accumulator now holds the sum; nothing else about single devices remains
    contributors = [dev_of[u] for u in res.contributors]
    total = update_codec.reduce_ring(res.total, sa.ring_bits)
    summed = secagg.dequantize_sum(total, update_codec.quant_config(sa), len(contributors))
    k, sl, sc = spec.sparse.k, update_codec.sketch_len(spec.sparse, sa), update_codec.scoring_len(spec.scoring)
    # The weights arrive masked like the values: only their sum exists here.
    weight, weighted_loss = update_codec.untail(summed[k + sl + sc :], sa.clip)
    if weight <= 0:
        raise secagg.SecAggAbort(f"the contributors' summed weight is {weight:.3g}: nothing to average")
    # The unmasked sum is checked before anything is applied: each weight is at most 1 and each
    # value within +-clip, so a sum outside that is a broken unmask or a forged input, and the
    # round is dropped rather than the model poisoned.
    if weight > 1.01 * len(contributors) + 1e-6:
        raise AggregateRejected(f"summed weight {weight:.4g} exceeds the {len(contributors)} contributors' maximum")
    peak = float(np.max(np.abs(summed[:k]))) / weight if k else 0.0
    if not np.isfinite(summed).all() or peak > 2 * sa.clip:
        raise AggregateRejected(f"aggregate out of bounds: mean peak {peak:.4g} against clip {sa.clip:g}")
    sketch = None
    if sa.sketch_block:
        # Where the fleet's unsent mass is (a sum over devices, like everything else we learn).
        sketch = update_codec.expand_blocks(summed[k : k + sl] / weight, sa.sketch_block, spec.sparse.dim)
    scores = update_codec.scores_from_sum(summed[k + sl : k + sl + sc], weight, sa.clip) if sc else None
    mean = sparse.scatter((summed[:k] / weight).astype(np.float32), b.idx, spec.sparse.dim)
    b.received = contributors
    return SecureResult(sparse.unflatten(mean, layout), contributors, sketch, weighted_loss / weight, scores)
