"""SecAgg+ round end to end, driven through the pure stage functions with simulated dropouts."""

from __future__ import annotations

import dataclasses
import math
import random
import tracemalloc
from collections.abc import Iterable

import numpy as np
import pytest

from shared.errors import ConfigError, ProtocolError, TruncatedError
from shared.secagg import _crypto, graph, messages, protocol, quant
from shared.secagg import (SecAggAbort, SecAggParams, ShareDecryptionError, client_advertise, client_masked_input,
                           client_share_keys, client_unmask, server_add_masked, server_collect_keys,
                           server_collect_shares, server_init, server_request_unmask, server_unmask,
                           unmask_request_for)

CHI2_CRIT_255 = 330.5  # chi-square, 255 dof, p = 0.001
PHASES = ("advertise", "share_keys", "masked_input")


RING = 0  # complete_up_to for tests of the SecAgg+ ring at small n (the protocol uses it above 100 nodes)


def params(n: int, t: int, dim: int, round_id: int = 7, complete_up_to: int | None = None) -> SecAggParams:
    return SecAggParams(round_id=round_id, node_ids=tuple(range(100, 100 + n)), threshold=t, dim=dim,
                        graph_seed=b"G" * 32, complete_up_to=complete_up_to)


def roundtrip(msg: messages.Message) -> messages.Message:
    """Every message crosses the wire codec, as it would over MQTT."""
    out = messages.decode(messages.encode(msg))
    assert out == msg
    return out


def run_round(p: SecAggParams, inputs: dict[int, np.ndarray], drop: dict[str, Iterable[int]]
              ) -> protocol.AggregateResult:
    """Drive one round; nodes in drop[phase] complete that phase and then vanish."""
    gone = {ph: set(drop.get(ph, ())) for ph in PHASES}
    server = server_init(p)
    clients, adv = {}, []
    for u in p.node_ids:
        clients[u], m = client_advertise(p, u)
        adv.append(roundtrip(m))
    server, nk = server_collect_keys(server, adv)
    shares = []
    for u, m in nk.items():
        if u in gone["advertise"]:
            continue
        clients[u], out = client_share_keys(clients[u], roundtrip(m))
        shares.append(roundtrip(out))
    server, fwd = server_collect_shares(server, shares)
    for u, m in fwd.items():
        if u in gone["share_keys"]:
            continue
        clients[u], y = client_masked_input(clients[u], roundtrip(m), inputs[u])
        server = server_add_masked(server, roundtrip(y))
    server, req = server_request_unmask(server)
    replies = []
    for u in req.survivors:
        if u in gone["masked_input"]:
            continue
        clients[u], r = client_unmask(clients[u], roundtrip(unmask_request_for(req, u)))
        replies.append(roundtrip(r))
    return server_unmask(server, replies)


def float_inputs(p: SecAggParams, cfg: quant.QuantConfig, seed: int) -> tuple[dict[int, np.ndarray],
                                                                             dict[int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    xs = {u: rng.normal(0.0, 0.3, p.dim) for u in p.node_ids}
    qs = {u: quant.quantize(x, cfg, seed=seed * 1000 + u) for u, x in xs.items()}
    return xs, qs


def check_sum(p: SecAggParams, cfg: quant.QuantConfig, drop: dict[str, list[int]], seed: int) -> None:
    xs, qs = float_inputs(p, cfg, seed)
    res = run_round(p, qs, drop)
    contributors = [u for u in p.node_ids if u not in set(drop.get("advertise", [])) | set(drop.get("share_keys", []))]
    assert res.contributors == tuple(contributors)
    true = np.clip(np.stack([xs[u] for u in contributors]), -cfg.clip, cfg.clip).sum(axis=0)
    got = quant.dequantize_sum(res.total, cfg, len(contributors))
    assert np.abs(got - true).max() <= quant.error_bound(cfg, len(contributors))


# n = 7 gives the complete graph (k = 2*ceil(log2 7) + 1 = 7), so "n - t survivors" is the global bound.
N, T, DIM = 7, 4, 500


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("n_drop", [0, 1, N - T])
def test_sum_matches_plaintext_with_dropouts(phase: str, n_drop: int) -> None:
    p = params(N, T, DIM)
    assert graph.neighbourhood_size(N) == N
    cfg = quant.QuantConfig(clip=1.0, n_summands=N)
    dropped = list(p.node_ids[1:1 + n_drop])
    check_sum(p, cfg, {phase: dropped}, seed=n_drop * 10 + PHASES.index(phase))


@pytest.mark.parametrize("phase", PHASES)
def test_below_threshold_aborts_without_result(phase: str) -> None:
    p = params(N, T, DIM)
    cfg = quant.QuantConfig(clip=1.0, n_summands=N)
    _, qs = float_inputs(p, cfg, 1)
    with pytest.raises(SecAggAbort):
        run_round(p, qs, {phase: list(p.node_ids[: N - T + 1])})


def test_dropouts_in_every_phase_on_a_sparse_graph() -> None:
    n = 40
    p = params(n, protocol.default_threshold(n, RING), 300, complete_up_to=RING)
    assert graph.neighbourhood_size(n, RING) == 13 < n and graph.neighbourhood_size(n) == n
    cfg = quant.QuantConfig(clip=0.5, n_summands=n)
    ids = p.node_ids
    check_sum(p, cfg, {"advertise": [ids[0]], "share_keys": [ids[11], ids[25]], "masked_input": [ids[3], ids[30]]},
              seed=5)


def test_sparse_graph_aborts_when_a_neighbourhood_is_starved() -> None:
    n = 40
    p = params(n, protocol.default_threshold(n, RING), 50, complete_up_to=RING)
    nb = p.neighbourhoods()
    victim = p.node_ids[0]
    others = sorted(nb[victim] - {victim})
    k_live_needed = p.threshold
    # Drop enough of one node's neighbours (but far fewer than n - t overall) to starve it.
    drop = others[: len(others) + 1 - k_live_needed + 1]
    cfg = quant.QuantConfig(clip=0.5, n_summands=n)
    _, qs = float_inputs(p, cfg, 2)
    with pytest.raises(SecAggAbort):
        run_round(p, qs, {"share_keys": drop})


@pytest.fixture
def deterministic_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seed every secret so the chi-square test below is one fixed experiment, not a 1/1000 coin flip."""
    rng = random.Random(2024)

    def keypair() -> tuple[bytes, bytes]:
        sk = bytes(rng.randrange(256) for _ in range(32))
        return sk, _crypto.public_from_private(sk)

    monkeypatch.setattr(_crypto, "new_keypair", keypair)
    monkeypatch.setattr(protocol.os, "urandom", lambda k: bytes(rng.randrange(256) for _ in range(k)))


def byte_chi2(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256).astype(np.float64)
    expected = len(data) / 256.0
    return float(((counts - expected) ** 2 / expected).sum())


def test_single_masked_vector_looks_uniform(deterministic_keys: None) -> None:
    dim = 1 << 15
    p = params(5, 3, dim)
    cfg = quant.QuantConfig(clip=1.0, n_summands=5)
    _, qs = float_inputs(p, cfg, 3)
    clients, fwd = _to_stage2(p)
    u = p.node_ids[2]
    _, y = client_masked_input(clients[u], fwd[u], qs[u])
    # The masked upload passes; the same test rejects the plaintext encoding, so it has power.
    assert byte_chi2(y.masked) < CHI2_CRIT_255
    assert byte_chi2(qs[u].astype("<u4").tobytes()) > CHI2_CRIT_255


def _to_stage2(p: SecAggParams) -> tuple[dict, dict]:
    _, clients, fwd = _to_stage2_with_server(p)
    return clients, fwd


def _shared_keys(p: SecAggParams) -> tuple[protocol.ServerState, dict, list]:
    """Every client advertised and produced its ShareKeys; the server has not relayed them yet."""
    server = server_init(p)
    clients, adv = {}, []
    for u in p.node_ids:
        clients[u], m = client_advertise(p, u)
        adv.append(m)
    server, nk = server_collect_keys(server, adv)
    sk = []
    for u in p.node_ids:
        clients[u], m = client_share_keys(clients[u], nk[u])
        sk.append(m)
    return server, clients, sk


def _to_stage2_with_server(p: SecAggParams) -> tuple[protocol.ServerState, dict, dict]:
    """Every client advertised and shared keys; the server relayed the shares."""
    server, clients, sk = _shared_keys(p)
    server, fwd = server_collect_shares(server, sk)
    return server, clients, fwd


@pytest.mark.parametrize("how", ["flip", "truncate", "swap_sender", "other_round"])
def test_tampered_share_is_rejected_with_typed_error(how: str) -> None:
    p = params(4, 3, 8)
    clients, fwd = _to_stage2(p)
    u = p.node_ids[0]
    m = fwd[u]
    s0, s1 = m.sealed[0], m.sealed[1]
    if how == "flip":
        blob = bytearray(s0.blob)
        blob[20] ^= 1
        bad = dataclasses.replace(m, sealed=(dataclasses.replace(s0, blob=bytes(blob)),) + m.sealed[1:])
    elif how == "truncate":
        bad = dataclasses.replace(m, sealed=(dataclasses.replace(s0, blob=s0.blob[:20]),) + m.sealed[1:])
    elif how == "swap_sender":  # a bundle relabelled as coming from another neighbour
        bad = dataclasses.replace(m, sealed=(dataclasses.replace(s0, blob=s1.blob), dataclasses.replace(s1, blob=s0.blob))
                                  + m.sealed[2:])
    else:  # replay into the next round: same ids, different associated data
        p2 = dataclasses.replace(p, round_id=p.round_id + 1)
        state = dataclasses.replace(clients[u], params=p2)
        with pytest.raises(ShareDecryptionError):
            client_masked_input(state, dataclasses.replace(m, round_id=p2.round_id), np.zeros(8, np.uint32))
        return
    with pytest.raises(ShareDecryptionError):
        client_masked_input(clients[u], bad, np.zeros(8, np.uint32))
    assert issubclass(ShareDecryptionError, ProtocolError)


def test_client_refuses_to_reveal_both_secrets_of_a_node() -> None:
    p = params(4, 3, 8)
    clients, fwd = _to_stage2(p)
    for u in p.node_ids:
        clients[u], _ = client_masked_input(clients[u], fwd[u], np.zeros(8, np.uint32))
    u, v = p.node_ids[0], p.node_ids[1]
    req = messages.UnmaskRequest(p.round_id, u, survivors=tuple(p.node_ids), dropped=(v,))
    with pytest.raises(ProtocolError):
        client_unmask(clients[u], req)


def test_server_memory_is_streaming() -> None:
    n, dim = 24, 200_000
    p = params(n, protocol.default_threshold(n), dim)
    server, clients2, fwd = _to_stage2_with_server(p)
    x = np.ones(dim, dtype=np.uint32)
    dropped = set(p.node_ids[:2])
    peak = 0
    for u in p.node_ids:
        if u in dropped:
            continue
        clients2[u], y = client_masked_input(clients2[u], fwd[u], x)
        tracemalloc.start()
        server = server_add_masked(server, y)
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        del y
    server, req = server_request_unmask(server)
    replies = []
    for u in req.survivors:
        clients2[u], r = client_unmask(clients2[u], unmask_request_for(req, u))
        replies.append(r)
    tracemalloc.start()
    res = server_unmask(server, replies)
    peak = max(peak, tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
    assert np.array_equal(res.total, np.full(dim, n - 2, dtype=np.uint32))
    assert peak < 3 * 4 * dim  # a few vectors' worth, independent of n (n vectors would be 24x)


def test_params_validation() -> None:
    with pytest.raises(ConfigError):
        params(5, 1, 4)  # t < 2
    with pytest.raises(ConfigError):
        params(40, 14, 4, complete_up_to=RING)  # t > neighbourhood size 13
    for n, t in ((4, 2), (40, 6), (7, 3)):  # t <= k/2: two halves of a neighbourhood could each reach t
        with pytest.raises(ConfigError, match="more than half"):
            params(n, t, 4, complete_up_to=RING)
    params(40, 7, 4, complete_up_to=RING)  # 7 > 13/2
    with pytest.raises(ConfigError, match="more than half"):
        params(40, 7, 4)  # the protocol's own graph at 40 nodes is complete: 7 is not more than 40/2
    with pytest.raises(ConfigError):
        SecAggParams(round_id=1, node_ids=(1, 1), threshold=2, dim=4, graph_seed=bytes(32))


def test_wrong_length_input_is_rejected() -> None:
    p = params(3, 2, 8)
    clients, fwd = _to_stage2(p)
    u = p.node_ids[0]
    with pytest.raises(ConfigError):
        client_masked_input(clients[u], fwd[u], np.zeros(9, np.uint32))


def test_truncated_message_raises() -> None:
    p = params(3, 2, 8)
    _, m = client_advertise(p, p.node_ids[0])
    raw = messages.encode(m)
    with pytest.raises(TruncatedError):
        messages.decode(raw[:-1])
    with pytest.raises(ProtocolError):
        messages.decode(raw + b"\x00")


@pytest.mark.parametrize("n", [100, 1000])
def test_secaggplus_graph_degree_and_symmetry(n: int) -> None:
    nb = graph.build(range(n), b"R" * 32, complete_up_to=RING)
    h = math.ceil(math.log2(n))
    assert all(len(v) == 2 * h + 1 and u in v for u, v in nb.items())  # k = 2*ceil(log2 n)+1 incl. self
    assert all(u in nb[v] for u, vs in nb.items() for v in vs)
    assert nb == graph.build(range(n), b"R" * 32, complete_up_to=RING)
    assert nb != graph.build(range(n), b"S" * 32, complete_up_to=RING)
    assert graph.neighbourhoods_of(range(n), b"R" * 32, [3, 7], complete_up_to=RING) == {3: nb[3], 7: nb[7]}


@pytest.mark.parametrize("n", [8, 12, 100])
def test_cohorts_up_to_100_get_the_complete_graph_as_the_threat_model_states(n: int) -> None:
    assert graph.COMPLETE_UP_TO == 100 and graph.neighbourhood_size(n) == n
    assert all(v == frozenset(range(n)) for v in graph.build(range(n), b"R" * 32).values())
    assert graph.neighbourhood_size(101) == 2 * 7 + 1


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_small_cohorts_get_the_complete_graph(n: int) -> None:
    nb = graph.build(range(n), bytes(32))
    assert all(v == frozenset(range(n)) for v in nb.values())


def test_server_drops_a_client_that_shares_with_the_wrong_nodes() -> None:
    p = params(5, 3, 8)
    server, clients, sk = _shared_keys(p)
    bad = sk[0]
    sk[0] = dataclasses.replace(bad, sealed=bad.sealed[1:])  # withholds one neighbour's shares
    server, fwd = server_collect_shares(server, sk)
    assert bad.sender not in server.u2 and bad.sender not in fwd
    assert all(s.peer != bad.sender for m in fwd.values() for s in m.sealed)
