"""Issue 22's attacks, over the real aggregator and edge clients (the in-process fleet of
``tests.secure_fleet``: real stage code, real LoRA updates, the in-memory bus).

The aggregator is made malicious by swapping its secure-aggregation stage functions
(``shared.secagg.hardened.server_*``, which ``aggregator.secure_round`` calls) for ones that
deviate; a device is made malicious by rewriting what it masks. Each attack must fail for the
attacker: the devices refuse with a signed ``declined`` and the reason, or the aggregator detects
and voids the round. Where an attack needs a bound to hold (colluders, the mean's range), a
control with the bound broken shows the test can tell.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

from shared import crypto, update_codec
from shared.secagg import graph, hardened, messages, protocol
from tests.secagg_attacker import gather, rebuild, recover_input, signed_request
from tests.secure_fleet import N, build_fleet, check_sum, run_round, sent


@pytest.fixture(scope="module")
def fleet(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    return build_fleet(tiny_models, tmp_path_factory.mktemp("secure_attacks"))


def _declined(rec, why: str) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(d for d, r in rec.drop_reasons.items() if r.startswith("declined: refused:") and why in r)


# ---------------------------------------------------------------------------------------- 1. downgrade


@pytest.mark.parametrize("switch", [dict(secagg=False), dict(secagg=False, sparse_method="device_topk")],
                         ids=["plain", "device_topk"])
def test_an_aggregator_cannot_switch_secure_aggregation_off_for_a_round(fleet, switch: dict) -> None:
    """The aggregator sets secagg = false in one round's spec (or per-device top-k, plain only):
    every device refuses, signed and with the reason, sends nothing, and the next round is secure."""
    agg, edges, _, _ = fleet
    secure_cfg = agg.cfg
    agg.cfg = dataclasses.replace(secure_cfg, density=0.25, **switch)
    try:
        rec, before, after = run_round(fleet, {})
    finally:
        agg.cfg = secure_cfg
    assert rec.status == "abandoned" and not rec.secagg and rec.received == []
    assert _declined(rec, "without secure aggregation") == [f"device-{i}" for i in range(N)], rec.drop_reasons
    np.testing.assert_array_equal(before, after)
    assert not (agg.out / "received" / f"round_{rec.round:04d}").exists()  # no individual update ever arrived
    rec, before, after = run_round(fleet, {})
    assert rec.status == "ok" and rec.secagg
    check_sum(fleet, rec, before, after)


# --------------------------------------------------------------------- 2. the threshold, on the ring


def test_the_lowest_threshold_on_the_ring_is_refused_and_the_default_works(tiny_models, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The aggregator picks the lowest t devices used to accept (floor(k/2) + 1) for a SecAgg+ ring
    of 12: each device, with its default floor ceil(2k/3), declines. At the default t the same
    fleet completes the round over the ring, and the sum is exact."""
    monkeypatch.setattr(graph, "COMPLETE_UP_TO", 8)  # the ring at 12 devices (both sides run here)
    n = 12
    k = graph.neighbourhood_size(n)
    assert k == 9 < n
    fl = build_fleet(tiny_models, tmp_path, n=n, device_overrides={"secagg_min_threshold": None},
                     secagg_threshold=k // 2 + 1)
    rec, before, after = run_round(fl, {})
    assert rec.status == "abandoned"
    assert _declined(rec, f"threshold {k // 2 + 1} of a neighbourhood of {k}, below this device's floor of 6") == sorted(
        f"device-{i}" for i in range(n)), rec.drop_reasons
    np.testing.assert_array_equal(before, after)
    agg = fl[0]
    agg.cfg = dataclasses.replace(agg.cfg, secagg_threshold=0)  # the default: 2/3 of each neighbourhood
    rec, before, after = run_round(fl, {})
    assert rec.status == "ok" and len(rec.received) == n, rec.abandon_reason
    check_sum(fl, rec, before, after)


def test_an_aggregator_cannot_unmask_a_device_by_telling_two_stories_on_the_ring(tiny_models, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch,
                                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Split view on the ring of 12 at the lowest t the devices were set to accept: the aggregator
    tells half the survivors that device-0 survived (they would reveal shares of its self-mask)
    and the others that it dropped (shares of its mask key), relaying each half the signatures on
    its own story. A device reveals a node's share only with t signatures from that node's own
    neighbourhood on its set: neither story gathers them, and the aggregator gets neither secret."""
    monkeypatch.setattr(graph, "COMPLETE_UP_TO", 8)
    n, target = 12, 0
    k = graph.neighbourhood_size(n)
    t = k // 2 + 1
    fl = build_fleet(tiny_models, tmp_path, n=n, secagg_threshold=t)  # devices accept down to k/2 (0.5)
    captured: list[messages.UnmaskShares] = []
    _split_view(monkeypatch, target, alive_side=set(range(1, n, 2)), captured=captured)
    with caplog.at_level(logging.WARNING, logger="aggregator.collect"):
        rec, before, after = run_round(fl, {})
    assert rec.status == "abandoned"
    seeds, keys = gather(captured)
    assert rebuild(seeds.get(target, {}), t) is None or rebuild(keys.get(target, {}), t) is None
    # The devices said why they did not answer (signed declined statuses, logged by the aggregator).
    assert caplog.text.count("neighbourhood signed this survivor set") >= n // 2, caplog.text[-2000:]
    np.testing.assert_array_equal(before, after)


def _split_view(monkeypatch: pytest.MonkeyPatch, target: int, alive_side: set[int], captured: list,
                colluders: dict[int, crypto.DeviceKeys] | None = None, device_of: dict[int, str] | None = None,
                masked: dict[int, bytes] | None = None, peers: dict[int, tuple[int, ...]] | None = None) -> None:
    """Make the aggregator equivocate about ``target``: ``alive_side`` (and the target, and any
    colluders) is told it survived, everyone else that it dropped; colluders sign both stories.
    What the devices answer is ``captured`` instead of being unmasked."""
    real_request, real_receipts, real_add = (hardened.server_request_consistency, hardened.server_collect_receipts,
                                             hardened.server_add_masked)
    colluders = colluders or {}
    told: dict[int, tuple[int, ...]] = {}

    def request(state):  # type: ignore[no-untyped-def]
        state, reqs = real_request(state)
        alive = tuple(sorted(state.inner.u3))
        dead = tuple(v for v in alive if v != target)
        for v in reqs:
            told[v] = alive if v in alive_side or v == target or v in colluders else dead
        return state, {v: dataclasses.replace(r, survivors=told[v]) for v, r in reqs.items()}

    def collect(state, msgs):  # type: ignore[no-untyped-def]
        by_story: dict[tuple[int, ...], dict[int, bytes]] = {}
        for m in msgs:
            by_story.setdefault(told[m.sender], {})[m.sender] = m.sig
        p = state.inner.params
        for c, key in colluders.items():  # a colluder signs every story it appears in
            for story in set(told.values()):
                if c in story:
                    payload = hardened._consistency_payload(p.round_id, hardened.list_hash(state.entries), story)  # noqa: SLF001
                    by_story.setdefault(story, {})[c] = crypto.sign(payload, key, aad=crypto.AssociatedData(
                        p.round_id, (device_of or {})[c], hardened.CONSISTENCY_KIND))
        out = {v: signed_request(state, v, told[v], by_story.get(told[v], {}))
               for story in by_story.values() for v in story if v not in colluders}
        return state, out

    def unmask(state, msgs):  # type: ignore[no-untyped-def]
        captured.extend(msgs)
        raise protocol.SecAggAbort("the attacker keeps the shares instead of unmasking")

    def receipts(state, msgs):  # type: ignore[no-untyped-def]
        state, out = real_receipts(state, msgs)
        if peers is not None:
            peers.update({v: m.peers for v, m in out.items()})
        return state, out

    def add(state, msg):  # type: ignore[no-untyped-def]
        if masked is not None:
            masked[msg.sender] = msg.masked
        return real_add(state, msg)

    monkeypatch.setattr(hardened, "server_request_consistency", request)
    monkeypatch.setattr(hardened, "server_collect_consistency", collect)
    monkeypatch.setattr(hardened, "server_unmask", unmask)
    monkeypatch.setattr(hardened, "server_collect_receipts", receipts)
    monkeypatch.setattr(hardened, "server_add_masked", add)


# ------------------------------------------------------------------------ 3. colluders, at the bound


def _collusion_round(tiny_models, root: Path, monkeypatch: pytest.MonkeyPatch, colluding: int):  # type: ignore[no-untyped-def]
    """Seven devices, the complete graph, the default t = 5 (devices' default floors): device-0 the
    target, devices 1..colluding collude with the aggregator (they hand over the shares of the
    target they hold and sign both stories). Returns what the attacker could rebuild."""
    n, target = 7, 0
    fl = build_fleet(tiny_models, root, n=n, device_overrides={"secagg_min_threshold": None}, secagg_threshold=0)
    agg, edges, _, _ = fl
    t = protocol.default_threshold(n)
    colluders = {c: edges[c].keys for c in range(1, 1 + colluding)}
    held: dict[int, tuple[bytes, bytes]] = {}
    real_open = hardened.client_open_shares

    def open_shares(state, msg):  # type: ignore[no-untyped-def]
        state, rc = real_open(state, msg)
        if state.inner.node_id in colluders:
            held[state.inner.node_id] = state.inner.received[target]
        return state, rc

    monkeypatch.setattr(hardened, "client_open_shares", open_shares)
    spec: list = []
    real_announce = agg._announce
    monkeypatch.setattr(agg, "_announce", lambda b: (spec.append(b.spec), real_announce(b)))
    honest = [v for v in range(1, n) if v not in colluders]
    # The best split there is: as many told "survived" as the seed needs, the rest "dropped".
    alive_side = set(honest[: max(0, t - 1 - colluding)])
    captured: list = []
    masked: dict[int, bytes] = {}
    peers: dict[int, tuple[int, ...]] = {}
    _split_view(monkeypatch, target, alive_side, captured, colluders, {c: f"device-{c}" for c in colluders}, masked, peers)
    s_pk: dict[int, bytes] = {}
    real_reveals = hardened.server_collect_reveals
    monkeypatch.setattr(hardened, "server_collect_reveals",
                        lambda state, msgs: (s_pk.update({v: a.s_pk for v, a in state.adverts.items()}),
                                             real_reveals(state, msgs))[1])
    rec, _, _ = run_round(fl, {})
    seeds, keys = gather(captured)
    for c, (b_sh, s_sh) in held.items():
        seeds.setdefault(target, {})[c] = b_sh
        keys.setdefault(target, {})[c] = s_sh
    attack = dict(b_u=rebuild(seeds.get(target, {}), t), s_u=rebuild(keys.get(target, {}), t), masked=masked,
                  peers=peers, s_pk=s_pk, spec=spec[-1])
    return fl, rec, attack


def test_colluders_within_the_stated_bound_cannot_unmask_a_device(tiny_models, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """c = 2t - k - 1 = 2 colluders at n = 7, t = 5 (the threat model's bound): the aggregator
    gets at most one of the target's two secrets."""
    fl, rec, a = _collusion_round(tiny_models, tmp_path, monkeypatch, colluding=2)
    assert rec.status == "abandoned" and (a["b_u"] is None or a["s_u"] is None)


def test_one_colluder_over_the_bound_unmasks_a_device_the_control(tiny_models, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: with 2t - k = 3 colluders the same attack rebuilds both secrets and strips the
    target's masks, giving its exact input (within one quantization step of what it trained). The
    bound is tight, and the colluder test above can tell an attack that works."""
    fl, rec, a = _collusion_round(tiny_models, tmp_path, monkeypatch, colluding=3)
    assert a["b_u"] is not None and a["s_u"] is not None
    root = fl[3]
    spec = a["spec"]
    sa = spec.secagg
    got = recover_input(a["masked"][0], 0, a["b_u"], rec.round, {v: a["s_u"] for v in a["peers"][0]}, a["s_pk"])
    x = update_codec.reduce_ring(got, sa.ring_bits)
    cfg = update_codec.quant_config(sa)
    values = x[: spec.sparse.k].astype(np.float64) / cfg.scale - sa.clip
    truth = sent(root, "device-0", rec.round)[update_codec.round_indices(spec.sparse)]
    assert np.abs(values - truth).max() <= 1.0 / cfg.scale + 1e-9
    assert np.count_nonzero(truth) > 0.5 * truth.size  # a real training delta, recovered


# -------------------------------------------------------------------------------------- 4. grinding


def test_a_grinding_aggregator_cannot_redraw_the_graph(tiny_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The aggregator sees the contributions that make the ring graph and would rather have
    another one: it leaves an advert out and sends a second advert list. Every device refuses it
    (the list is fixed before the contributions are revealed), and the round is void."""
    monkeypatch.setattr(graph, "COMPLETE_UP_TO", 8)
    n = 12
    fl = build_fleet(tiny_models, tmp_path, n=n, secagg_threshold=0)
    agg = fl[0]
    real = hardened.server_collect_reveals

    def grind(state, msgs):  # type: ignore[no-untyped-def]
        real(state, msgs)  # the graph the reveals give: not the one it wants
        entries = state.entries[1:]
        b = agg.book
        dev_of = {v: d for d, v in b.node_of.items()}
        for e in entries:
            agg.col.send_to(dev_of[e.node], "secagg", _secagg_msg(b.rnd, dev_of[e.node], messages.AdvertList(b.rnd, e.node, entries)))
        agg.col.collect("reveal", {dev_of[e.node] for e in entries}, 2.0)
        raise protocol.SecAggAbort("grinding: no second set of reveals came")

    monkeypatch.setattr(hardened, "server_collect_reveals", grind)
    rec, before, after = run_round(fl, {})
    assert rec.status == "abandoned"
    assert len(_declined(rec, "second advert list")) == n - 1, rec.drop_reasons
    np.testing.assert_array_equal(before, after)


def _secagg_msg(rnd: int, device: str, inner: messages.Message):  # type: ignore[no-untyped-def]
    from shared import messages as M
    from shared import secagg

    return M.SecAggMsg(round=rnd, device_id=device, body=secagg.encode(inner))


# ---------------------------------------------------------------------------- 5. inflated contributions


def _evil_input(fleet, monkeypatch: pytest.MonkeyPatch, rewrite) -> None:  # type: ignore[no-untyped-def]
    """device-4 rewrites the ring values it masks (a device can put anything under its masks)."""
    bad = fleet[1][4]
    real = bad.send_masked

    def send(spec, state, msg):  # type: ignore[no-untyped-def]
        built, res = bad.sa_built
        x = rewrite(built.x.copy(), spec)
        bad.sa_built = (dataclasses.replace(built, x=x), res)
        return real(spec, state, msg)

    monkeypatch.setattr(bad, "send_masked", send)


def _ring_value(spec, v: float) -> int:  # type: ignore[no-untyped-def]
    """What one device's slot holds to decode as v (beyond +-clip if it likes)."""
    cfg = update_codec.quant_config(spec.secagg)
    return int(round((v + spec.secagg.clip) * cfg.scale))


def test_a_device_claiming_a_large_weight_voids_the_round(fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22: one device claimed weight 4.95 against four honest 0.012s and moved the mean 15x.
    Every device now weighs 1, the summed weight slot must equal the contributors, and the claim
    is detected: the round is void, the model unchanged, and the record says which slot."""
    def weigh(x, spec):  # type: ignore[no-untyped-def]
        x[-2] = _ring_value(spec, 4.95 * spec.secagg.clip)
        return x

    _evil_input(fleet, monkeypatch, weigh)
    rec, before, after = run_round(fleet, {})
    assert rec.status == "abandoned" and rec.abandon_reason.startswith("aggregate rejected: slot 'weight'"), rec.abandon_reason
    np.testing.assert_array_equal(before, after)


def test_values_beyond_the_clip_void_the_round_and_within_it_move_the_mean_at_most_the_clip(
        fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of range under the masks (every coordinate at 6 x clip): detected, the round void.
    The residual the threat model states: a device that stays inside the summed bounds is not
    detected, and can set any coordinate of the mean anywhere within +-clip, never beyond."""
    agg = fleet[0]
    c = agg.cfg.clip
    _evil_input(fleet, monkeypatch, lambda x, spec: np.concatenate([np.full(spec.sparse.k, _ring_value(spec, 6 * c), np.uint32),
                                                                      x[spec.sparse.k:]]))
    rec, before, after = run_round(fleet, {})
    assert rec.status == "abandoned" and rec.abandon_reason.startswith("aggregate rejected: slot 'values'"), rec.abandon_reason
    np.testing.assert_array_equal(before, after)
    monkeypatch.undo()
    # Inside the bound: n x clip in total on every coordinate, less what the others sent.
    _evil_input(fleet, monkeypatch, lambda x, spec: np.concatenate([np.full(spec.sparse.k, _ring_value(spec, 0.6 * N * c), np.uint32),
                                                                      x[spec.sparse.k:]]))
    rec, before, after = run_round(fleet, {})
    assert rec.status == "ok", rec.abandon_reason
    moved = np.abs(after - before)
    assert moved.max() <= c + 1e-6 and moved.max() > 0.5 * c  # owned, but only within the clip


def test_a_plain_round_clips_and_caps_a_device_that_claims_everything(tiny_models, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain rounds (devices that allow them): num_examples of 2^31 - 1 and values of 3e38 used to
    own the mean. Each value is clipped to +-clip and the weight capped: the mean moves at most
    the clip, and by exactly the clipped, capped weighted mean."""
    fl = build_fleet(tiny_models, tmp_path, secagg=False, density=1.0, sparse_method="random")
    agg, edges, _, root = fl
    bad = edges[4]
    real = bad.train_round

    def claim(spec, announcement=None):  # type: ignore[no-untyped-def]
        up = real(spec, announcement)
        from shared import tensors

        huge = {k: np.full(v.shape, 3e38, np.float32) for k, v in tensors.unpack(up.tensors).items()}
        return dataclasses.replace(up, num_examples=2**31 - 1, tensors=tensors.pack(huge))

    monkeypatch.setattr(bad, "train_round", claim)
    rec, before, after = run_round(fl, {})
    assert rec.status == "ok" and "device-4" in rec.received
    c, cap = agg.cfg.clip, agg.cfg.max_weight_examples
    w = {d: min(len(e.examples), cap) for d, e in zip((e.cfg.device_id for e in edges), edges)}
    w["device-4"] = cap
    honest = {d: np.clip(sent(root, d, rec.round).astype(np.float64), -c, c) for d in rec.received if d != "device-4"}
    want = (sum(w[d] * honest[d] for d in honest) + cap * c) / sum(w[d] for d in rec.received)
    np.testing.assert_allclose(after - before, want, atol=1e-6)
    assert np.abs(after - before).max() <= c + 1e-6


def test_a_device_cannot_move_the_fleets_distribution_by_inflating_a_score() -> None:
    """fl-minillm scores: one device put 0.844 of the fleet's mean mass on a chosen candidate (from
    0.001). The unmasked sum of scores must be a distribution per rollout position and zero past a
    rollout's end: the inflated bucket breaks the per-position sum, and the round is void."""
    from aggregator.secure_round import AggregateRejected, check_bounds

    from shared import messages as M
    from shared import tensors

    b, npos, kk, n, clip = 2, 3, 4, 5, 0.05
    mask = np.array([[1, 1, 0], [1, 1, 1]], np.uint8)
    sc = M.ScoringSpec(rollouts=b, positions=npos, k=kk, prompt_len=2, tensors=tensors.pack({
        "ids": np.zeros((b, 2 + npos), np.int32), "candidates": np.zeros((b, npos, kk), np.int32), "mask": mask}))
    sp = M.SparseSpec(method="dense", dim=4, k=4, seed=0, indices=b"", value_dtype="float32")
    sa = M.SecAggSpec(node_ids=tuple(range(n)), threshold=4, graph_seed=bytes(32), clip=clip, ring_bits=32,
                      value_bits=update_codec.value_bits_for(n, 32), weight_norm=1, sketch_block=0)
    spec = M.RoundSpec(round=1, participants=tuple(f"d{i}" for i in range(n)), local_steps=1, learning_rate=1e-3,
                       lora=M.LoraSpec(r=1, alpha=1.0, dropout=0.0, target_modules=("q_proj",)), base_digest="ab" * 32,
                       deadline_s=1.0, seed=0, adapter=(), sparse=sp, secagg=sa, scoring=sc)
    rng = np.random.default_rng(0)
    honest = []
    for _ in range(n):
        p = np.zeros((b, npos, kk + 1))
        p[..., :kk] = 0.001
        p[..., kk] = 1 - kk * 0.001
        p *= mask[..., None]
        honest.append(np.concatenate([rng.uniform(-clip, clip, 4), update_codec.scores_to_ring(p.reshape(-1), 1, clip),
                                      update_codec.tail(1.0, 1.0, clip)]))
    total = sum(honest)
    check_bounds(total, spec, n)  # honest: passes
    evil = honest[-1].copy()
    s0 = 4  # scores start after the 4 values; bucket 0 of rollout 0, position 0
    evil[s0] = (2 * (0.844 * n - 0.001 * (n - 1)) - 1) * clip  # the mean there becomes 0.844
    with pytest.raises(AggregateRejected, match="sum to"):
        check_bounds(sum(honest[:-1]) + evil, spec, n)
    evil = honest[-1].copy()
    evil[s0 + (kk + 1) * 2] = 0.5 * clip  # a bucket past rollout 0's end (position 2 is masked out)
    with pytest.raises(AggregateRejected, match="past the rollouts' ends"):
        check_bounds(sum(honest[:-1]) + evil, spec, n)
