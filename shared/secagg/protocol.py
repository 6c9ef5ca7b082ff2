"""SecAgg+ round as pure stage functions (Bonawitz et al. 2017, semi-honest; Bell et al. 2020 graph).

Every stage takes a frozen state plus the messages that arrived and returns the next state plus
the messages to send; there is no I/O here, so the MQTT layer, the simulator and the tests drive
the same code. Dropouts are simply messages that never arrive.

Stages and who is alive after each (U1 >= U2 >= U3 >= U4):
  0 advertise    client -> AdvertiseKeys                   server -> NeighbourKeys   (U1)
  1 share keys   client -> ShareKeys (sealed Shamir shares) server -> ForwardedShares (U2)
  2 masked input client -> MaskedInput y_u                  server -> UnmaskRequest   (U3)
  3 unmask       client -> UnmaskShares                     server -> AggregateResult (U4)
with y_u = x_u + PRG(b_u) + sum_{v in N(u) & U2, v != u} sign(u, v) * PRG(s_uv)  mod 2^32.

Threshold t applies per neighbourhood (with a complete graph, to the whole cohort): whenever a
live node has fewer than t live neighbourhood members, or a secret the server needs has fewer
than t shares, the server raises ``SecAggAbort`` and no sum exists. A client answers an unmask
request only if no node is listed both as survivor and as dropped, so the server never learns
both b_u and s_u^SK of anyone, which is what would unmask an individual input.

The server's accumulator is a single uint32 vector updated in place as masked inputs arrive and
as masks are removed one at a time: peak memory O(d), not O(n*d).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from shared.errors import ConfigError, ProtocolError
from shared.secagg import _crypto, graph, prg, shamir
from shared.secagg.messages import (AdvertiseKeys, BundleReceipt, ForwardedShares, KeyEntry, MaskedInput, MaskPeers,
                                    NeighbourKeys, OwnedShare, Sealed, ShareKeys, UnmaskRequest, UnmaskShares)

log = logging.getLogger(__name__)

_BUNDLE = struct.Struct(">II")  # sender, recipient, then two shares


class SecAggAbort(ProtocolError):
    """Too few participants survive for the round to be both correct and private; no sum exists."""


@dataclass(frozen=True)
class SecAggParams:
    """Round settings every party receives from the aggregator's round spec.

    node_ids: the cohort (uint32 ids); the graph and the share points derive from them.
    threshold: t, the shares needed to reconstruct a secret, per neighbourhood.
    dim: length of the uint32 vector each client contributes.
    graph_seed: 32 public random bytes fixing the SecAgg+ graph for this round.
    complete_up_to: the complete graph up to this many nodes; None: the protocol's
        ``graph.COMPLETE_UP_TO`` (benchmarks set 0 to compare the ring with Flower's at every n).
    """

    round_id: int
    node_ids: tuple[int, ...]
    threshold: int
    dim: int
    graph_seed: bytes
    complete_up_to: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.round_id, int) or not 0 <= self.round_id < 1 << 64:
            raise ConfigError(f"SecAggParams.round_id must be a uint64, got {self.round_id!r}")
        ids = self.node_ids
        if len(set(ids)) != len(ids) or any(not isinstance(i, int) or not 0 <= i < (1 << 32) - 1 for i in ids):
            raise ConfigError("SecAggParams.node_ids must be distinct ints in [0, 2^32 - 1)")
        k = self.k
        # t >= 2 so no single share reveals a secret; t <= k so every secret is recoverable at all;
        # t > k/2 so that two disjoint halves of a neighbourhood can never both reach t, which is
        # what an aggregator telling some survivors "u lived" and others "u dropped" would need to
        # rebuild both of u's secrets. A device refuses a round that asks for less.
        if not isinstance(self.threshold, int) or not 2 <= self.threshold <= k or 2 * self.threshold <= k:
            raise ConfigError(f"SecAggParams.threshold must be in [{max(2, k // 2 + 1)}, {k}] for {len(ids)} nodes "
                              f"(more than half of the neighbourhood of {k}), got {self.threshold!r}")
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ConfigError(f"SecAggParams.dim must be an int >= 1, got {self.dim!r}")
        if not isinstance(self.graph_seed, bytes) or len(self.graph_seed) != prg.SEED_BYTES:
            raise ConfigError(f"SecAggParams.graph_seed must be {prg.SEED_BYTES} bytes")

    @property
    def k(self) -> int:
        """Neighbourhood size (self included)."""
        return graph.neighbourhood_size(len(self.node_ids), self.complete_up_to)

    def neighbourhoods(self, seed: bytes | None = None) -> dict[int, frozenset[int]]:
        return graph.build(self.node_ids, self.graph_seed if seed is None else seed, self.complete_up_to)


def default_threshold(n: int, complete_up_to: int | None = None) -> int:
    """A majority-plus of the neighbourhood: 2/3 of k, at least 2 (the Bonawitz 1/3 dropout budget)."""
    k = graph.neighbourhood_size(n, complete_up_to)
    return min(k, max(2, -(-2 * k // 3)))


def _x(node: int) -> int:
    return node + 1


def _sign(u: int, v: int) -> int:
    return 1 if u < v else -1


# --------------------------------------------------------------------------------------- client


@dataclass(frozen=True)
class ClientState:
    params: SecAggParams
    node_id: int
    neighbours: frozenset[int]
    c_sk: bytes
    s_sk: bytes
    stage: int = 0
    peer_keys: Mapping[int, KeyEntry] = field(default_factory=dict)
    b_seed: bytes = b""
    own_shares: tuple[bytes, bytes] = (b"", b"")
    received: Mapping[int, tuple[bytes, bytes]] = field(default_factory=dict)
    u2: frozenset[int] = frozenset()
    opened: bool = False
    # What the share bundles are bound to besides (round, sender, recipient): the hardened round's
    # graph seed, so a bundle sealed under another advert list (another "world" the aggregator
    # showed other devices) does not open, and every holder of a node's shares shares its view.
    context: bytes = b""


def _expect(state: ClientState, stage: int, round_id: int, recipient: int) -> None:
    if state.stage != stage:
        raise ProtocolError(f"client {state.node_id} is at stage {state.stage}, got a stage-{stage} message")
    if round_id != state.params.round_id or recipient != state.node_id:
        raise ProtocolError(f"message for round {round_id}/node {recipient} reached "
                            f"round {state.params.round_id}/node {state.node_id}")


def client_advertise(params: SecAggParams, node_id: int) -> tuple[ClientState, AdvertiseKeys]:
    """Stage 0: fresh key pairs for this round (never reused, so PRG seeds are single-use)."""
    if node_id not in params.node_ids:
        raise ConfigError(f"node {node_id} is not in the round's cohort")
    c_sk, c_pk = _crypto.new_keypair()
    s_sk, s_pk = _crypto.new_keypair()
    state = ClientState(params, node_id, params.neighbourhoods()[node_id], c_sk, s_sk, stage=1)
    return state, AdvertiseKeys(params.round_id, node_id, c_pk, s_pk)


def client_share_keys(state: ClientState, msg: NeighbourKeys) -> tuple[ClientState, ShareKeys]:
    """Stage 1: Shamir-share b_u and s_u^SK among live neighbours, sealed to each one's c_pk."""
    _expect(state, 1, msg.round_id, msg.recipient)
    t, me = state.params.threshold, state.node_id
    keys = {e.node: e for e in msg.keys}
    if len(keys) != len(msg.keys):
        raise ProtocolError("neighbour key list repeats a node")
    if not set(keys) <= state.neighbours:
        raise ProtocolError(f"server sent keys of non-neighbours {sorted(set(keys) - state.neighbours)[:5]}")
    mine = keys.get(me)
    if mine is None or mine.c_pk != _crypto.public_from_private(state.c_sk) or \
            mine.s_pk != _crypto.public_from_private(state.s_sk):
        raise ProtocolError("server did not echo this client's own public keys")
    pks = [e.c_pk for e in keys.values()] + [e.s_pk for e in keys.values()]
    if len(set(pks)) != len(pks):
        raise ProtocolError("advertised public keys are not distinct")
    if len(keys) < t:
        raise SecAggAbort(f"only {len(keys)} live neighbours after advertise, threshold {t}")
    b_seed = os.urandom(prg.SEED_BYTES)
    holders = sorted(keys)
    xs = [_x(v) for v in holders]
    b_sh = shamir.split(b_seed, xs, t)
    s_sh = shamir.split(state.s_sk, xs, t)
    sealed, own = [], (b"", b"")
    for v, bs, ss in zip(holders, b_sh, s_sh):
        if v == me:
            own = (bs.to_bytes(), ss.to_bytes())
            continue
        key = _crypto.share_key(state.c_sk, keys[v].c_pk, state.params.round_id)
        plain = _BUNDLE.pack(me, v) + bs.to_bytes() + ss.to_bytes()
        sealed.append(Sealed(v, _crypto.seal(key, state.params.round_id, me, v, plain, state.context)))
    new = replace(state, stage=2, peer_keys=keys, b_seed=b_seed, own_shares=own)
    return new, ShareKeys(state.params.round_id, me, tuple(sealed))


def _open_bundle(state: ClientState, s: Sealed) -> tuple[bytes, bytes]:
    """One neighbour's (b share, s^SK share) addressed to us; ProtocolError if it does not open."""
    p, me = state.params, state.node_id
    key = _crypto.share_key(state.c_sk, state.peer_keys[s.peer].c_pk, p.round_id)
    plain = _crypto.open_sealed(key, p.round_id, s.peer, me, s.blob, state.context)
    if len(plain) != _BUNDLE.size + 2 * shamir.SHARE_BYTES or _BUNDLE.unpack(plain[:8]) != (s.peer, me):
        raise _crypto.ShareDecryptionError(f"share bundle from {s.peer} names the wrong parties")
    b_share, s_share = plain[8:8 + shamir.SHARE_BYTES], plain[8 + shamir.SHARE_BYTES:]
    for raw in (b_share, s_share):
        if shamir.Share.from_bytes(raw).x != _x(me):
            raise ProtocolError(f"share from {s.peer} is not evaluated at this client's point")
    return b_share, s_share


def client_open_shares(state: ClientState, msg: ForwardedShares) -> tuple[ClientState, BundleReceipt]:
    """Stage 2a, before training: open the bundles addressed to us and report the ones that fail.

    A bundle that does not open is its sender's fault (or the relay's): that pair is cut, not
    this client's round. The relay repeating or inventing senders is still an error.
    """
    _expect(state, 2, msg.round_id, msg.recipient)
    if state.opened:
        raise ProtocolError("share bundles already opened this round")
    me = state.node_id
    received: dict[int, tuple[bytes, bytes]] = {}
    rejected: list[int] = []
    for s in msg.sealed:
        if s.peer not in state.peer_keys or s.peer == me or s.peer in received or s.peer in rejected:
            raise ProtocolError(f"unexpected or repeated share bundle from node {s.peer}")
        try:
            received[s.peer] = _open_bundle(state, s)
        except (ProtocolError, ValueError) as e:
            log.warning("node %d: share bundle from node %d rejected (%s); cutting that pair", me, s.peer, e)
            rejected.append(s.peer)
    new = replace(state, received=received, opened=True)
    return new, BundleReceipt(state.params.round_id, me, tuple(sorted(rejected)))


def client_mask(state: ClientState, msg: MaskPeers, x: np.ndarray) -> tuple[ClientState, MaskedInput]:
    """Stage 2b, after training: mask ``x`` (uint32 from ``quant.quantize``) with the peers the
    server kept after the cuts; they must be peers whose shares this client holds.

    At least t - 1 of them (``_mask``): with fewer, the input could not be unmasked. That is also
    enough against an aggregator that cuts pairs and then calls the kept peers dropped: it would
    need t seed shares from holders other than this node (which refuses a survivor set without
    its peers) and the kept peers, k - 1 - (t - 1 - c) >= t, i.e. t <= (k + c) / 2, below the floor."""
    _expect(state, 2, msg.round_id, msg.recipient)
    if not state.opened:
        raise ProtocolError("mask peers before the share bundles were opened")
    peers = frozenset(msg.peers)
    if state.node_id in peers or not peers <= set(state.received):
        raise ProtocolError("mask peers name nodes whose shares this client does not hold")
    return _mask(replace(state, received={v: state.received[v] for v in sorted(peers)}), x)


def _mask(state: ClientState, x: np.ndarray) -> tuple[ClientState, MaskedInput]:
    p, me = state.params, state.node_id
    x = np.asarray(x)
    if x.dtype != np.uint32 or x.shape != (p.dim,):
        raise ConfigError(f"input must be uint32 of shape ({p.dim},), got {x.dtype} {x.shape}")
    u2 = frozenset(state.received) | {me}
    if len(u2) < p.threshold:
        raise SecAggAbort(f"only {len(u2)} live neighbours after share keys, threshold {p.threshold}")
    y = x.copy()
    prg.add_mask(y, state.b_seed, 1)
    for v in sorted(u2 - {me}):
        seed = _crypto.mask_seed(state.s_sk, state.peer_keys[v].s_pk, p.round_id)
        prg.add_mask(y, seed, _sign(me, v))
    new = replace(state, stage=3, u2=u2)
    return new, MaskedInput(p.round_id, me, y.astype("<u4", copy=False).tobytes())


def client_masked_input(state: ClientState, msg: ForwardedShares,
                        x: np.ndarray) -> tuple[ClientState, MaskedInput]:
    """Stage 2 in one step (the semi-honest round without receipts): open, then mask ``x``.

    Without a receipt the server cannot cut a pair, so here a bundle that fails to open fails
    this client; the hardened round uses ``client_open_shares`` + ``client_mask`` instead.
    """
    x = np.asarray(x)
    if x.dtype != np.uint32 or x.shape != (state.params.dim,):
        raise ConfigError(f"input must be uint32 of shape ({state.params.dim},), got {x.dtype} {x.shape}")
    state, receipt = client_open_shares(state, msg)
    if receipt.rejected:
        raise _crypto.ShareDecryptionError(f"share bundles from {list(receipt.rejected)[:5]} do not open")
    return _mask(state, x)


def client_unmask(state: ClientState, msg: UnmaskRequest) -> tuple[ClientState, UnmaskShares]:
    """Stage 3: reveal b shares of survivors and s^SK shares of dropouts, never both for one node."""
    _expect(state, 3, msg.round_id, msg.recipient)
    me, t = state.node_id, state.params.threshold
    surv, drop = set(msg.survivors), set(msg.dropped)
    if surv & drop:
        raise ProtocolError(f"nodes {sorted(surv & drop)[:5]} listed as both survivor and dropout")
    if me not in surv:
        raise ProtocolError("unmask request does not list this client as a survivor")
    if len(surv & state.u2) < t:
        raise SecAggAbort(f"only {len(surv & state.u2)} surviving neighbours, threshold {t}")
    def share(v: int, which: int) -> bytes:
        return state.own_shares[which] if v == me else state.received[v][which]
    seed_sh = tuple(OwnedShare(v, share(v, 0)) for v in sorted(surv & state.u2))
    key_sh = tuple(OwnedShare(v, share(v, 1)) for v in sorted(drop & state.u2))
    # Forget the secrets: a replayed request must not extract a second, different answer.
    new = replace(state, stage=4, b_seed=b"", received={}, own_shares=(b"", b""))
    return new, UnmaskShares(state.params.round_id, me, seed_sh, key_sh)


# --------------------------------------------------------------------------------------- server


@dataclass(frozen=True)
class ServerState:
    params: SecAggParams
    neighbours: Mapping[int, frozenset[int]]
    stage: int = 0
    keys: Mapping[int, KeyEntry] = field(default_factory=dict)
    u2: frozenset[int] = frozenset()
    u3: frozenset[int] = frozenset()
    acc: np.ndarray | None = None
    cut: bool = False  # receipts collected: ``neighbours`` and ``u2`` are the cut graph


@dataclass(frozen=True)
class AggregateResult:
    """The unmasked uint32 sum and who is in it; decode with ``quant.dequantize_sum(total, n)``."""

    total: np.ndarray
    contributors: tuple[int, ...]


def server_init(params: SecAggParams) -> ServerState:
    return ServerState(params, params.neighbourhoods())


def _check_alive(state: ServerState, alive: frozenset[int], stage: str) -> None:
    t = state.params.threshold
    if len(alive) < t:
        raise SecAggAbort(f"{len(alive)} clients left after {stage}, threshold {t}")
    for u in alive:
        live = len(state.neighbours[u] & alive)
        if live < t:
            raise SecAggAbort(f"node {u} has {live} live neighbours after {stage}, threshold {t}")


def _fresh(state: ServerState, stage: int, msgs: Iterable[AdvertiseKeys | ShareKeys | BundleReceipt | UnmaskShares],
           allowed: frozenset[int] | Iterable[int]) -> dict[int, object]:
    """Keep one message per allowed sender for this round; log and drop the rest."""
    if state.stage != stage:
        raise ProtocolError(f"server is at stage {state.stage}, not {stage}")
    allowed = frozenset(allowed)
    out: dict[int, object] = {}
    for m in msgs:
        if m.round_id != state.params.round_id or m.sender not in allowed or m.sender in out:
            log.warning("ignoring stage-%d message from node %s (round %s)", stage, m.sender, m.round_id)
            continue
        out[m.sender] = m
    return out


def server_collect_keys(state: ServerState, msgs: Iterable[AdvertiseKeys]
                        ) -> tuple[ServerState, dict[int, NeighbourKeys]]:
    """Stage 0: send each live client the keys of its live neighbourhood."""
    got = _fresh(state, 0, msgs, state.params.node_ids)
    keys = {u: KeyEntry(u, m.c_pk, m.s_pk) for u, m in got.items()}  # type: ignore[attr-defined]
    u1 = frozenset(keys)
    _check_alive(state, u1, "advertise")
    r = state.params.round_id
    out = {u: NeighbourKeys(r, u, tuple(keys[v] for v in sorted(state.neighbours[u] & u1))) for u in u1}
    return replace(state, stage=1, keys=keys), out


def server_collect_shares(state: ServerState, msgs: Iterable[ShareKeys]
                          ) -> tuple[ServerState, dict[int, ForwardedShares]]:
    """Stage 1: relay sealed bundles among clients that completed share keys (U2)."""
    got: dict[int, ShareKeys] = _fresh(state, 1, msgs, state.keys)  # type: ignore[assignment]
    for u in list(got):
        targets = [s.peer for s in got[u].sealed]
        expected = (state.neighbours[u] & frozenset(state.keys)) - {u}
        if len(targets) != len(set(targets)) or set(targets) != expected:
            # A client that does not share with exactly its live neighbours could not be unmasked
            # if it dropped later; treat it as dropped now rather than failing everyone's round.
            log.warning("node %d shared with %s, not its live neighbours; dropping it", u, sorted(targets)[:5])
            del got[u]
    u2 = frozenset(got)
    _check_alive(state, u2, "share keys")
    inbox: dict[int, list[Sealed]] = {u: [] for u in u2}
    for u, m in got.items():
        for s in m.sealed:
            if s.peer in u2:
                inbox[s.peer].append(Sealed(u, s.blob))
    r = state.params.round_id
    out = {v: ForwardedShares(r, v, tuple(sorted(box, key=lambda s: s.peer))) for v, box in inbox.items()}
    return replace(state, stage=2, u2=u2, u3=frozenset()), out


def server_collect_receipts(state: ServerState, msgs: Iterable[BundleReceipt]
                            ) -> tuple[ServerState, dict[int, MaskPeers]]:
    """Stage 2a: cut every pair a receipt rejects, then tell each client whom to mask with.

    A node without a receipt, or left with fewer than t - 1 peers after the cuts (its input
    could be neither unmasked nor kept private), leaves the round before anyone masks with it;
    that can cascade, so this runs to a fixed point. What is left is the graph everyone masks
    over, and the dropout recovery of stage 3 follows it.
    """
    if state.stage != 2 or state.cut or state.u3:
        raise ProtocolError("receipts arrive once, before any masked input")
    got: dict[int, BundleReceipt] = _fresh(state, 2, msgs, state.u2)  # type: ignore[assignment]
    t = state.params.threshold
    edges = {u: set((state.neighbours[u] & frozenset(got)) - {u}) for u in got}
    for u, m in got.items():
        for v in m.rejected:
            if v in edges[u]:
                log.warning("node %d rejected the share bundle of node %d: pair cut", u, v)
                edges[u].discard(v)
                edges.get(v, set()).discard(u)
    short = [u for u in edges if len(edges[u]) + 1 < t]
    while short:
        for u in short:
            log.warning("node %d has %d peers left after the cuts, threshold %d: it leaves the round",
                        u, len(edges[u]), t)
            for v in edges.pop(u):
                if v in edges:
                    edges[v].discard(u)
        short = [u for u in edges if len(edges[u]) + 1 < t]
    u2 = frozenset(edges)
    neighbours = {**state.neighbours, **{u: frozenset(edges[u] | {u}) for u in u2}}
    new = replace(state, neighbours=neighbours, u2=u2, cut=True)
    _check_alive(new, u2, "bundle receipts")
    r = state.params.round_id
    return new, {u: MaskPeers(r, u, tuple(sorted(edges[u]))) for u in u2}


def server_add_masked(state: ServerState, msg: MaskedInput) -> ServerState:
    """Stage 2, one message at a time: fold y_u into the running sum and forget it.

    The accumulator array is owned by the state chain and updated in place (the one deliberate
    exception to purity, so the server never holds more than one input vector).
    """
    if state.stage != 2:
        raise ProtocolError(f"server is at stage {state.stage}, not 2")
    p = state.params
    if msg.round_id != p.round_id or msg.sender not in state.u2 or msg.sender in state.u3:
        log.warning("ignoring masked input from node %s (round %s)", msg.sender, msg.round_id)
        return state
    if len(msg.masked) != 4 * p.dim:
        raise ProtocolError(f"masked input from {msg.sender} has {len(msg.masked)} bytes, expected {4 * p.dim}")
    acc = state.acc if state.acc is not None else np.zeros(p.dim, dtype=np.uint32)
    np.add(acc, np.frombuffer(msg.masked, dtype="<u4"), out=acc, casting="unsafe")
    return replace(state, acc=acc, u3=state.u3 | {msg.sender})


def server_request_unmask(state: ServerState) -> tuple[ServerState, UnmaskRequest]:
    """End of stage 2: fix U3 and broadcast (survivors, dropped) to every survivor."""
    if state.stage != 2:
        raise ProtocolError(f"server is at stage {state.stage}, not 2")
    _check_alive(state, state.u3, "masked input")
    req = UnmaskRequest(state.params.round_id, 0, tuple(sorted(state.u3)), tuple(sorted(state.u2 - state.u3)))
    return replace(state, stage=3), req


def unmask_request_for(req: UnmaskRequest, node: int) -> UnmaskRequest:
    """The broadcast request addressed to one client."""
    return replace(req, recipient=node)


def _reconstruct(state: ServerState, owner: int, shares: Mapping[int, bytes], what: str) -> bytes:
    t = state.params.threshold
    if len(shares) < t:
        raise SecAggAbort(f"{len(shares)} shares of {what} of node {owner}, threshold {t}")
    pts = []
    for holder, raw in shares.items():
        sh = shamir.Share.from_bytes(raw)
        if sh.x != _x(holder):
            raise ProtocolError(f"node {holder} sent a share of {what} of node {owner} at the wrong point")
        pts.append(sh)
    return shamir.reconstruct(pts, t)


def server_unmask(state: ServerState, msgs: Iterable[UnmaskShares]) -> AggregateResult:
    """Stage 3: rebuild b_u of survivors and s_v^SK of dropouts; strip their masks one at a time."""
    got: dict[int, UnmaskShares] = _fresh(state, 3, msgs, state.u3)  # type: ignore[assignment]
    u4 = frozenset(got)
    t = state.params.threshold
    if len(u4) < t:
        raise SecAggAbort(f"{len(u4)} clients sent unmask shares, threshold {t}")
    dropped = state.u2 - state.u3
    seed_sh: dict[int, dict[int, bytes]] = {u: {} for u in state.u3}
    key_sh: dict[int, dict[int, bytes]] = {v: {} for v in dropped}
    for w, m in got.items():
        for table, items in ((seed_sh, m.seed_shares), (key_sh, m.key_shares)):
            for o in items:
                if o.owner not in table or o.owner not in state.neighbours[w]:
                    raise ProtocolError(f"node {w} sent an unrequested share for node {o.owner}")
                table[o.owner][w] = o.share
    # Reconstruct everything before touching the sum, so an abort leaves no partial result.
    b_seeds = {u: _reconstruct(state, u, seed_sh[u], "b") for u in sorted(state.u3)}
    s_keys = {}
    for v in sorted(dropped):
        sk = _reconstruct(state, v, key_sh[v], "s_sk")
        if _crypto.public_from_private(sk) != state.keys[v].s_pk:
            raise ProtocolError(f"reconstructed mask key of node {v} does not match its public key")
        s_keys[v] = sk
    acc = state.acc
    assert acc is not None  # _check_alive at request time guarantees at least t inputs
    r = state.params.round_id
    for u, seed in b_seeds.items():
        prg.add_mask(acc, seed, -1)
    for v, sk in s_keys.items():
        for w in sorted((state.neighbours[v] & state.u3) - {v}):
            # w added sign(w, v) * PRG(s_wv) to y_w; v's input never arrived to cancel it.
            prg.add_mask(acc, _crypto.mask_seed(sk, state.keys[w].s_pk, r), -_sign(w, v))
    log.info("secagg round %d: %d contributors, %d dropouts recovered", r, len(state.u3), len(dropped))
    return AggregateResult(acc, tuple(sorted(state.u3)))
