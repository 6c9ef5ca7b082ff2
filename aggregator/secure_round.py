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
from shared import dp, secagg, sparse, update_codec
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
    sa, k = b.spec.secagg, update_codec.masked_dim(b.spec.sparse, b.spec.secagg, b.spec.scoring)
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
        authority: Any, certs: Mapping[str, hardened.EnrolledCert]) -> SecureResult | None:
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
                                 dim=update_codec.masked_dim(spec.sparse, sa, spec.scoring), graph_seed=sa.graph_seed)
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
        ident = hardened.Identity(dev_of, authority)
        got = col.collect("advertise", set(spec.participants), key_timeout_s)
        b.sa, lists = hardened.server_collect_adverts(b.sa, got.values(), ident, certs)
        _relay(col, b, lists)
        # The advert list is fixed and sent before anyone reveals a graph-seed contribution, so
        # which adverts count cannot be chosen with the graph in view.
        got = col.collect("reveal", {dev_of[u] for u in lists}, key_timeout_s)
        try:
            b.sa, keys = hardened.server_collect_reveals(b.sa, got.values())
        except hardened.SeedWithheld as e:
            for u in e.nodes:
                b.drop(dev_of[u], "withheld its graph-seed contribution: the round could not draw its graph")
            raise
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
    with col.metrics.stage("unmask_sum"):  # rebuilding the masks to remove: what grows with the fleet and its dropouts
        res = hardened.server_unmask(b.sa, got.values())
    b.sa = None  # the accumulator now holds the sum; nothing else about single devices remains
    contributors = [dev_of[u] for u in res.contributors]
    n = len(contributors)
    total = update_codec.reduce_ring(res.total, sa.ring_bits)
    if sa.dp is not None:
        # The noisy sum of the L2-clipped inputs, rotated back (shared.dp); still a sum over devices.
        summed = dp.decode_sum(total, sa.dp, sa.ring_bits, update_codec.secagg_dim(spec.sparse, sa, spec.scoring))
    else:
        summed = secagg.dequantize_sum(total, update_codec.quant_config(sa), n)
    slots = check_bounds(summed, spec, n)
    # Every device weighs 1: the mean's denominator is the number of contributors, not a masked
    # weight that no one could bound.
    sketch = None
    if sa.sketch_block:
        # Where the fleet's unsent mass is (a sum over devices, like everything else we learn).
        sketch = update_codec.expand_blocks(slots["sketch"] / n, sa.sketch_block, spec.sparse.dim)
    scores = update_codec.scores_from_sum(slots["scores"], n, sa.clip) if spec.scoring is not None else None
    mean = sparse.scatter((slots["values"] / n).astype(np.float32), b.idx, spec.sparse.dim)
    b.received = contributors
    loss = float(slots["tail"][1]) / sa.clip * update_codec.LOSS_CAP
    return SecureResult(sparse.unflatten(mean, layout), contributors, sketch, loss / n, scores)


def _slices(spec: M.RoundSpec) -> dict[str, slice]:
    assert spec.secagg is not None
    k, sl = spec.sparse.k, update_codec.sketch_len(spec.sparse, spec.secagg)
    sc = update_codec.scoring_len(spec.scoring)
    return {"values": slice(0, k), "sketch": slice(k, k + sl), "scores": slice(k + sl, k + sl + sc),
            "tail": slice(k + sl + sc, k + sl + sc + update_codec.TAIL)}


def check_bounds(summed: np.ndarray, spec: M.RoundSpec, n: int) -> dict[str, np.ndarray]:
    """Each named slot of the unmasked sum against what n honest inputs can sum to; the slots if
    they hold, else ``AggregateRejected`` naming the slot.

    Under masks no single input can be checked, so this is the only bound there is: a device that
    sends out-of-range values voids the round (detected, and counted in the record's abandon
    reason), while one that stays inside the summed bounds can still move the mean within them.
    That residual is stated in the README's threat model; per-device input validation (ACORN, Bell
    et al. 2023) is the known fix.
    """
    sa = spec.secagg
    assert sa is not None
    if not np.isfinite(summed).all():
        raise AggregateRejected("the unmasked sum has non-finite values")
    if sa.dp is not None:
        # A noisy sum leaves any fixed range by chance: widen each bound by what the noise (and
        # rounding) of n contributors can add except with probability 1e-9 over the whole vector,
        # so an honest round passes, while a value far outside (a wrapped coordinate, a device
        # sending garbage at full scale) still voids the round.
        qb = dp.noise_allowance(sa.dp, n, update_codec.secagg_dim(spec.sparse, sa, spec.scoring))
    else:
        qb = secagg.error_bound(update_codec.quant_config(sa), n)
    parts = {name: summed[s] for name, s in _slices(spec).items()}
    bounds = update_codec.slot_bounds(spec.sparse, sa, spec.scoring, n)
    named = {"values": parts["values"], "sketch": parts["sketch"], "scores": parts["scores"],
             "weight": parts["tail"][:1], "loss": parts["tail"][1:]}
    for name, v in named.items():
        lo, hi = bounds[name]
        if v.size and (v.min() < lo - qb or v.max() > hi + qb):
            worst = float(v.min()) if v.min() < lo - qb else float(v.max())
            raise AggregateRejected(f"slot {name!r} out of bounds: {worst:.4g} outside [{lo:.4g}, {hi:.4g}] "
                                    f"(+-{qb:.2g}) for {n} contributors")
    if spec.scoring is not None and sa.dp is None:
        # Under DP the scores are scaled by each device's L2 clip and noised: they no longer sum
        # to exactly 1 per position, and the slot bounds above are the check that remains.
        _check_scores(parts["scores"], spec.scoring, n, sa.clip, qb)
    return parts


SCORE_FLOAT_SLACK = 1e-4


def _check_scores(summed: np.ndarray, sc: M.ScoringSpec, n: int, clip: float, qb: float) -> None:
    """The fleet's scores are distributions: per rollout position the K + 1 buckets of each device
    sum to 1, and positions past a rollout's end are zeros (the aggregator made the rollouts)."""
    from shared import tensors

    mask = tensors.unpack(sc.tensors)["mask"].astype(bool)  # (B, N)
    mean = update_codec.scores_from_sum(summed, n, clip).reshape(sc.rollouts, sc.positions, sc.k + 1)
    e = qb / (2 * n * clip)  # the quantization bound on one mean bucket
    off = np.abs(mean[~mask]).max() if (~mask).any() else 0.0
    if off > e:
        raise AggregateRejected(f"scores past the rollouts' ends are {off:.4g}, not 0 (+-{e:.2g})")
    sums = mean[mask].sum(-1)
    # Devices compute their buckets in float32 (fl_lm.fleet_teacher): a sum off 1 by a few ulps
    # is theirs, not an attack; moving real mass (0.001 -> 0.844 in issue 22) is far beyond it.
    tol = (sc.k + 1) * e + SCORE_FLOAT_SLACK
    if sums.size and np.abs(sums - 1.0).max() > tol:
        raise AggregateRejected(f"the fleet's mean scores sum to {float(sums[np.argmax(np.abs(sums - 1))]):.6g} at a "
                                f"position, not 1 (+-{tol:.2g})")
