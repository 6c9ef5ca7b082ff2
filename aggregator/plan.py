"""Plan a round: which coordinates devices send, and the secure-aggregation parameters.

Pure with respect to the network: the config, the adapter layout and what the aggregator has
learnt so far (aggregate magnitudes, the fleet's summed sketch) in; a ``RoundSpec`` out.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from aggregator.config import AggregatorConfig
from shared import messages as M
from shared import dp, secagg, sparse, tensors, update_codec
from shared.errors import ConfigError
from shared.secagg.floors import Floors

log = logging.getLogger(__name__)


def sparse_spec(c: AggregatorConfig, dim: int, seed: int, scores: np.ndarray | None, sketch: np.ndarray | None) -> M.SparseSpec:
    k = max(1, min(dim, round(c.density * dim)))
    vd = c.sparse_value_dtype
    if k == dim:
        return M.SparseSpec(method="dense", dim=dim, k=dim, seed=seed, indices=b"", value_dtype=vd)  # type: ignore[arg-type]
    if c.sparse_method == "device_topk":
        return M.SparseSpec(method="device_topk", dim=dim, k=k, seed=seed, indices=b"", value_dtype=vd)  # type: ignore[arg-type]
    if c.sparse_method == "topk" and c.secagg and c.sketch_block and sketch is not None:
        # The fleet told us (in aggregate) where its unsent mass is: ask for exactly that.
        idx = sparse.select_indices(sketch, k, seed, explore=0.0)
        method = "topk"
    elif c.sparse_method == "random" or scores is None:
        # Global top-k needs a previous aggregate; the first round draws its coordinates at random.
        idx, method = sparse.random_k(dim, k, seed), "random"
    else:
        idx, method = sparse.select_indices(scores, k, seed, c.topk_explore), "topk"
    return M.SparseSpec(method=method, dim=dim, k=k, seed=seed, indices=sparse.encode_indices(idx, dim), value_dtype=vd)  # type: ignore[arg-type]


def secagg_spec(c: AggregatorConfig, participants: list[str], online: dict[str, int], method: str) -> M.SecAggSpec:
    n = len(participants)
    kk = secagg.graph.neighbourhood_size(n)
    t = min(c.secagg_threshold or secagg.default_threshold(n), kk)
    if 2 * t <= kk:
        raise secagg.SecAggAbort(f"threshold {t} is not more than half of the neighbourhood of {kk}: devices would refuse "
                                 f"it; raise secagg_threshold or leave it 0 (2/3 of each neighbourhood)")
    floor = Floors().threshold(kk)
    if t < floor:
        log.warning("threshold %d for a neighbourhood of %d is below the devices' default floor of %d (ceil(2k/3)): "
                    "devices with default floors decline the round", t, kk, floor)
    try:
        if c.dp.enabled:
            # The DP ring holds noisy signed sums sized by their wrap-around bound (shared.dp);
            # value_bits only keeps the spec's own ring check meaningful, nobody encodes with it.
            ring_bits = c.dp.ring_bits
            value_bits = update_codec.value_bits_for(n, ring_bits)
        else:
            ring_bits, value_bits = update_codec.ring_for(n, c.value_bits)
    except ConfigError as e:
        raise secagg.SecAggAbort(str(e)) from e
    return M.SecAggSpec(node_ids=tuple(range(n)), threshold=t, graph_seed=os.urandom(32), clip=c.clip,
                        ring_bits=ring_bits, value_bits=value_bits,
                        weight_norm=1,  # every device weighs 1: see AggregatorConfig.max_weight_examples
                        sketch_block=c.sketch_block if method != "dense" else 0)


def dp_spec(c: AggregatorConfig, sa: M.SecAggSpec, dim: int) -> dp.DPSpec:
    """The round's DP parameters: noise for the quorum (by default the threshold, the fewest
    survivors SecAgg+ unmasks), the scale sized for the whole cohort's noisy sum in the ring."""
    n, quorum = len(sa.node_ids), c.dp.quorum or sa.threshold
    if quorum > sa.threshold:
        raise secagg.SecAggAbort(f"dp.quorum {quorum} is above the round's threshold {sa.threshold}: a sum of fewer "
                                 "survivors could be unmasked with less than the target noise (devices refuse it)")
    try:
        scale = dp.size_scale(c.dp.l2_clip, c.dp.noise_multiplier, quorum, n, dim, sa.ring_bits, c.dp.wrap_probability)
    except ConfigError as e:
        raise secagg.SecAggAbort(str(e)) from e
    return dp.DPSpec(mechanism="skellam", l2_clip=c.dp.l2_clip, noise_multiplier=c.dp.noise_multiplier, quorum=quorum,
                     scale=scale, rotation_seed=os.urandom(dp.SEED_BYTES))


def round_spec(c: AggregatorConfig, rnd: int, participants: list[str], *, global_state: dict[str, np.ndarray],
               layout: sparse.Layout, lora: M.LoraSpec, digest: str, online: dict[str, int],
               scores: np.ndarray | None, sketch: np.ndarray | None,
               scoring: M.ScoringSpec | None = None, version: int | None = None) -> M.RoundSpec:
    """The round's announcement: global adapter, index set, secure-aggregation settings and, in an
    fl-minillm client-teacher round, the rollouts the devices score.

    ``version`` is how many rounds have changed the model so far. The seed (local training order,
    index set) follows it rather than the round number, so the k-th change of the model is made
    the same way whatever rounds were lost before it: a run with an aborted round ends where a
    fault-free run with one round fewer ends (tests/test_faults.py). Without faults the two agree.
    """
    seed = c.seed * 100_003 + (rnd if version is None else version + 1)
    sp = sparse_spec(c, layout.dim, seed, scores, sketch)
    sa = secagg_spec(c, participants, online, sp.method) if c.secagg else None
    if sa is not None and c.dp.enabled:
        sa = dataclasses.replace(sa, dp=dp_spec(c, sa, update_codec.secagg_dim(sp, sa, scoring)))
    return M.RoundSpec(round=rnd, participants=tuple(participants), local_steps=c.local_steps,
                       learning_rate=c.learning_rate, lora=lora, base_digest=digest,
                       deadline_s=c.round_timeout_s, seed=seed, adapter=tensors.pack(global_state),
                       sparse=sp, secagg=sa, scoring=scoring)


# Sealing adds an ephemeral key, nonce, tag, signature and the envelope's fields: well under this.
SEAL_OVERHEAD = 4096


def upload_cap(spec: M.RoundSpec, global_state: dict[str, np.ndarray]) -> int:
    """The largest sealed update a participant of this round can honestly send, in bytes.

    Computed from the round's own shape (what the update message encodes to with the biggest
    field values), so a manifest announcing more is refused before any chunk arrives.
    """
    sp, sa = spec.sparse, spec.secagg
    common = dict(round=spec.round, device_id="d" * 64, seq=2**63 - 1, num_examples=2**31 - 1, steps=2**31 - 1,
                  train_loss=0.0, base_digest=spec.base_digest)
    if sa is not None:
        k = update_codec.masked_dim(sp, sa, spec.scoring)
        msg: M.Message = M.MaskedUpdate(masked=bytes(sparse.ring_bytes(k, sa.ring_bits)), **common)  # type: ignore[arg-type]
    elif sp.method == "dense":
        msg = M.Update(payload="delta", tensors=tensors.pack(global_state), **common)  # type: ignore[arg-type]
    else:
        width = 2 if sp.value_dtype == "float16" else 4
        per = width + (5 if sp.method == "device_topk" else 0)  # values, plus a varint index each at most
        msg = M.SparseUpdate(encoding="topk" if sp.method == "device_topk" else "shared", values=bytes(per * sp.k + 1024),
                             **common)  # type: ignore[arg-type]
    return len(M.encode(msg)) + SEAL_OVERHEAD
