"""SecAgg+ against an aggregator that deviates: certified, signed key adverts, a neighbour graph
nobody can steer or grind, Bonawitz et al.'s consistency check per share owner, and the device's
own floors.

What each addition stops (attacks of issues 9 and 22):

- Key substitution. Every ``SignedAdvertise`` carries its sender's certificate from the fleet
  authority (``shared.authority``, not the aggregator's key) and a signature, with the certified
  key, over (round, node, c_pk, s_pk, commitment). A device checks every advert it uses against
  the pinned authority key and the device id the signed round spec gives that node; one failure
  and it refuses the round. The aggregator cannot forge a participant either: it has no
  certificate.
- Steering and grinding the graph. The graph derives from the spec's seed and one 32-byte
  contribution per counted node, committed to in its advert and revealed only once the set of
  counted adverts is fixed (``AdvertList``, which a device accepts once a round). So the
  aggregator picks which adverts count (leaving some out, to re-draw the graph, is what issue
  22 measured: 0.15 -> 0.90 chance of a captured neighbourhood with 4 left out) before anyone
  can compute the graph, and a colluding device cannot grind its keys (its commitment is fixed
  before it sees the others' contributions). A listed node that does not reveal voids the round
  (``SeedWithheld``): any fallback would hand the choice back. A list that counts fewer than t
  of the committed cohort is refused.
- A bad share bundle. Each device opens its neighbours' bundles before training and sends a
  receipt naming those that fail; the server cuts those pairs and tells each device whom to mask
  with (``MaskPeers``), so a device that sends garbage costs its own edges, not the round.
- Equivocation about who dropped. Before unmasking, every survivor signs (round, list hash,
  survivor set) once. A device reveals its shares of node o only when t members of o's own
  neighbourhood (from the derived graph; not the revealer's) signed the set it signed, checked
  for every o it reveals. With t > (k + c) / 2 two sets that disagree about o cannot both gather
  t signatures in o's neighbourhood while at most c of it collude (``shared.secagg.floors``).
  Checking only the revealer's own neighbourhood, as before, let a split view recover one
  device's input at the lowest t with no colluder on the SecAgg+ graph.

The stage functions wrap the semi-honest ones in ``protocol`` (same shares, same masks), so the
sum, the dropout recovery and the streaming accumulator are unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from shared import authority, crypto
from shared.errors import ProtocolError
from shared.secagg import graph, protocol
from shared.secagg.floors import Floors
from shared.secagg.messages import (AdvertList, BundleReceipt, ConsistencyRequest, ConsistencySig, ForwardedShares,
                                    KeyEntry, ListEntry, MaskedInput, MaskPeers, NeighbourKeys, SeedReveal, SignedAdvertise,
                                    SignedEntry, SignedKeys, SignedUnmaskRequest, UnmaskRequest, UnmaskShares, encode)

__all__ = ["AdvertList", "ConsistencyRequest", "ConsistencySig", "Identity", "PeerVerificationError", "SeedReveal",
           "SeedWithheld", "SignedAdvertise", "SignedKeys", "SignedUnmaskRequest", "client_advertise", "client_consistency",
           "client_mask", "client_open_shares", "client_reveal", "client_share_keys", "client_unmask", "server_add_masked",
           "server_collect_adverts", "server_collect_consistency", "server_collect_receipts", "server_collect_reveals",
           "server_collect_shares", "server_init", "server_request_consistency", "server_unmask"]

log = logging.getLogger(__name__)

_GRAPH_LABEL = b"fl-minillm/secagg/v3/graph"
_COMMIT_LABEL = b"fl-minillm/secagg/v3/commit"
ADVERT_KIND = "secagg_advert"
CONSISTENCY_KIND = "secagg_consistency"


class PeerVerificationError(ProtocolError):
    """A peer's advert, certificate or signature does not check out, or the aggregator's account
    of the round is inconsistent: the round is refused."""


class SeedWithheld(protocol.SecAggAbort):
    """Listed nodes did not reveal (or mis-revealed) their graph-seed contribution: no graph, no round."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = tuple(sorted(nodes))
        super().__init__(f"nodes {list(self.nodes)[:8]} did not reveal their graph-seed contribution: the round's "
                         "graph cannot be drawn (and re-drawing it without them would let the set be chosen)")


@dataclass(frozen=True)
class Identity:
    """Who the round's nodes are, and this party's signing means.

    device_of: node -> device id, from the signed round spec (participants and node ids).
    authority: the fleet authority's public keys, pinned.
    keys, cert: a device's own long-term keys and certificate; None on the aggregator.
    floors: a device's own floors (``shared.secagg.floors``); None: the protocol's bounds only.
    """

    device_of: Mapping[int, str]
    authority: crypto.PublicKeys
    keys: crypto.DeviceKeys | None = None
    cert: bytes = b""
    floors: Floors | None = None


def commitment(round_id: int, node: int, rho: bytes) -> bytes:
    """Hiding (rho is 32 random bytes) and bound to the node, so nobody can reuse another's."""
    return hashlib.sha256(_COMMIT_LABEL + struct.pack(">QI", round_id, node) + rho).digest()


def _advert_payload(round_id: int, node: int, c_pk: bytes, s_pk: bytes, commit: bytes) -> bytes:
    return b"adv" + struct.pack(">QI", round_id, node) + c_pk + s_pk + commit


def _consistency_payload(round_id: int, lhash: bytes, survivors: Iterable[int]) -> bytes:
    # The survivor list is hashed: a signature blob stays ~150 bytes however large the cohort, and
    # each device relays tens of them (its neighbours' neighbours' signatures) to answer an unmask.
    ids = sorted(survivors)
    surv = hashlib.sha256(struct.pack(f">I{len(ids)}I", len(ids), *ids)).digest()
    return b"con" + struct.pack(">Q", round_id) + lhash + surv


def digest(adv: SignedAdvertise) -> bytes:
    return hashlib.sha256(encode(adv)).digest()


def _advert_of(round_id: int, e: SignedEntry) -> SignedAdvertise:
    return SignedAdvertise(round_id, e.node, e.c_pk, e.s_pk, e.commit, e.cert, e.sig)


def _entry_of(a: SignedAdvertise) -> SignedEntry:
    return SignedEntry(a.sender, a.c_pk, a.s_pk, a.commit, a.cert, a.sig)


def list_hash(entries: Iterable[ListEntry]) -> bytes:
    h = hashlib.sha256(_GRAPH_LABEL)
    for e in entries:
        h.update(struct.pack(">I", e.node) + e.digest + e.commit)
    return h.digest()


def graph_seed(spec_seed: bytes, round_id: int, lhash: bytes, rhos: Iterable[tuple[int, bytes]]) -> bytes:
    """The round's graph seed: the spec's, the fixed advert list, and every listed node's revealed contribution."""
    h = hashlib.sha256(_GRAPH_LABEL + spec_seed + struct.pack(">Q", round_id) + lhash)
    for node, rho in rhos:
        h.update(struct.pack(">I", node) + rho)
    return h.digest()


def check_advert(ident: Identity, round_id: int, e: SignedEntry | SignedAdvertise, node: int) -> crypto.PublicKeys:
    """The node's certified long-term keys, if its advert is genuine; else PeerVerificationError."""
    device = ident.device_of.get(node)
    if device is None:
        raise PeerVerificationError(f"node {node} is not in the signed cohort")
    try:
        keys = authority.verify(authority.Certificate.from_blob(device, e.cert), ident.authority, device)
        payload = crypto.verify(e.sig, keys, aad=crypto.AssociatedData(round_id, device, ADVERT_KIND))
    except (crypto.CryptoError, ProtocolError, ValueError) as exc:
        raise PeerVerificationError(f"advert of node {node} ({device}) does not verify: {exc}") from exc
    if payload != _advert_payload(round_id, node, e.c_pk, e.s_pk, e.commit):
        raise PeerVerificationError(f"advert of node {node} ({device}) is signed for other keys")
    return keys


# --------------------------------------------------------------------------------------- client


@dataclass(frozen=True)
class HardenedClient:
    inner: protocol.ClientState
    advert: SignedAdvertise
    rho: bytes = b""  # this node's graph-seed contribution, revealed once the advert list is fixed
    listed: tuple[ListEntry, ...] | None = None  # the advert list this device accepted (once a round)
    list_hash: bytes = b""
    seed: bytes = b""  # the derived graph seed
    peer_sign: Mapping[int, crypto.PublicKeys] = field(default_factory=dict)
    signed: tuple[int, ...] | None = None  # the survivor set this device signed (once a round)


def client_advertise(params: protocol.SecAggParams, node_id: int, ident: Identity) -> tuple[HardenedClient, SignedAdvertise]:
    if ident.keys is None or not ident.cert:
        raise ProtocolError("a hardened round needs this device's keys and certificate")
    if ident.floors is not None:
        ident.floors.check_round(len(params.node_ids), params.threshold, params.k)
    inner, adv = protocol.client_advertise(params, node_id)
    rho = os.urandom(32)
    commit = commitment(params.round_id, node_id, rho)
    device = ident.device_of[node_id]
    sig = crypto.sign(_advert_payload(params.round_id, node_id, adv.c_pk, adv.s_pk, commit), ident.keys,
                      aad=crypto.AssociatedData(params.round_id, device, ADVERT_KIND))
    signed = SignedAdvertise(params.round_id, node_id, adv.c_pk, adv.s_pk, commit, ident.cert, sig)
    return HardenedClient(inner, signed, rho), signed


def client_reveal(state: HardenedClient, msg: AdvertList, ident: Identity) -> tuple[HardenedClient, SeedReveal]:
    """Accept the round's advert list (once) and reveal this node's contribution to the graph seed."""
    p, me = state.inner.params, state.inner.node_id
    if msg.round_id != p.round_id or msg.recipient != me:
        raise ProtocolError(f"advert list for round {msg.round_id}/node {msg.recipient} reached {p.round_id}/{me}")
    if state.listed is not None or state.inner.stage != 1:
        raise PeerVerificationError("a second advert list this round: the set of adverts must be fixed before the "
                                    "contributions are revealed")
    nodes = [e.node for e in msg.entries]
    if nodes != sorted(set(nodes)) or not set(nodes) <= set(p.node_ids):
        raise PeerVerificationError("advert list is not a sorted subset of the cohort")
    own = {e.node: e for e in msg.entries}.get(me)
    if own is None or own.digest != digest(state.advert) or own.commit != state.advert.commit:
        raise PeerVerificationError("this device's own advert is missing from the advert list, or altered")
    n = len(p.node_ids)
    if len(nodes) < p.threshold:
        raise PeerVerificationError(f"the advert list leaves out {n - len(nodes)} of the {n} committed participants, "
                                    f"more than the n - t = {n - p.threshold} the round can lose")
    if ident.floors is not None:
        ident.floors.check_survivors(len(nodes), p.threshold)
    new = replace(state, listed=tuple(msg.entries), list_hash=list_hash(msg.entries))
    return new, SeedReveal(p.round_id, me, state.rho)


def client_share_keys(state: HardenedClient, msg: SignedKeys, ident: Identity):  # type: ignore[no-untyped-def]
    """Check every contribution against its commitment, derive the graph, verify every
    neighbour's advert against the list, then share keys as usual."""
    p, me = state.inner.params, state.inner.node_id
    if msg.round_id != p.round_id or msg.recipient != me:
        raise ProtocolError(f"signed keys for round {msg.round_id}/node {msg.recipient} reached {p.round_id}/{me}")
    if state.listed is None:
        raise ProtocolError("signed keys before the advert list")
    listed = {e.node: e for e in state.listed}
    nodes = [n for n, _ in msg.rhos]
    if nodes != sorted(set(nodes)) or set(nodes) != set(listed):
        raise PeerVerificationError("the contributions sent are not those of the advert list")
    for node, rho in msg.rhos:
        if commitment(p.round_id, node, rho) != listed[node].commit:
            raise PeerVerificationError(f"node {node}'s contribution does not open its commitment")
    seed = graph_seed(p.graph_seed, p.round_id, state.list_hash, msg.rhos)
    nb = graph.neighbourhoods_of(p.node_ids, seed, [me], p.complete_up_to)[me]
    want = nb & set(listed)
    got = {e.node: e for e in msg.keys}
    if len(got) != len(msg.keys) or set(got) != want:
        raise PeerVerificationError(f"server sent adverts of {sorted(got)[:5]}..., the derived neighbourhood is "
                                    f"{sorted(want)[:5]}...")
    signers: dict[int, crypto.PublicKeys] = {}
    for node, e in got.items():
        if digest(_advert_of(p.round_id, e)) != listed[node].digest:
            raise PeerVerificationError(f"advert of node {node} differs from its listed digest")
        signers[node] = check_advert(ident, p.round_id, e, node)
    inner = replace(state.inner, neighbours=nb, context=seed)
    plain = NeighbourKeys(p.round_id, me, tuple(KeyEntry(n, got[n].c_pk, got[n].s_pk) for n in sorted(got)))
    inner, out = protocol.client_share_keys(inner, plain)
    return replace(state, inner=inner, seed=seed, peer_sign=signers), out


def client_open_shares(state: HardenedClient, msg: ForwardedShares) -> tuple[HardenedClient, BundleReceipt]:
    """Before training: open the neighbours' bundles; the receipt names the ones that failed."""
    inner, out = protocol.client_open_shares(state.inner, msg)
    return replace(state, inner=inner), out


def client_mask(state: HardenedClient, msg: MaskPeers, x: np.ndarray) -> tuple[HardenedClient, MaskedInput]:
    """After training: mask with the peers left after the cuts (a subset of the bundles we hold)."""
    inner, out = protocol.client_mask(state.inner, msg, x)
    return replace(state, inner=inner), out


def client_consistency(state: HardenedClient, req: ConsistencyRequest, ident: Identity) -> tuple[HardenedClient, ConsistencySig]:
    """Sign the survivor set, once a round, if it is consistent with what this device saw."""
    inner, me = state.inner, state.inner.node_id
    if req.round_id != inner.params.round_id or req.recipient != me:
        raise ProtocolError("consistency request for another round or node")
    if inner.stage != 3:
        raise ProtocolError(f"consistency request at stage {inner.stage}")
    if state.signed is not None:
        raise ProtocolError("this device already signed a survivor set this round")
    if req.list_hash != state.list_hash:
        raise PeerVerificationError("the consistency request is for another advert list: the server equivocated")
    surv = tuple(sorted(set(req.survivors)))
    if me not in surv or not set(surv) <= set(inner.params.node_ids):
        raise ProtocolError("survivor set does not list this device, or lists strangers")
    if ident.floors is not None:
        ident.floors.check_survivors(len(surv), inner.params.threshold)
    assert ident.keys is not None
    device = ident.device_of[me]
    sig = crypto.sign(_consistency_payload(req.round_id, req.list_hash, surv), ident.keys,
                      aad=crypto.AssociatedData(req.round_id, device, CONSISTENCY_KIND))
    return replace(state, signed=surv), ConsistencySig(req.round_id, me, sig)


def _agreeing(state: HardenedClient, req: SignedUnmaskRequest, ident: Identity, surv: tuple[int, ...]) -> set[int]:
    """The survivors whose signature on (list, surv) verifies, this device included."""
    p, me = state.inner.params, state.inner.node_id
    payload = _consistency_payload(req.round_id, state.list_hash, surv)
    listed = {e.node: e for e in state.listed or ()}
    extra = {e.node: e for e in req.signers}
    members = set(surv)
    agree = {me}
    for node, sig in req.sigs:
        if node in agree or node not in members:
            continue
        pk = state.peer_sign.get(node)
        if pk is None:
            # A signer outside this device's neighbourhood: its advert must be the listed one.
            e = extra.get(node)
            if e is None or node not in listed or digest(_advert_of(p.round_id, e)) != listed[node].digest:
                continue
            try:
                pk = check_advert(ident, p.round_id, e, node)
            except PeerVerificationError:
                continue
        try:
            ok = crypto.verify(sig, pk, aad=crypto.AssociatedData(req.round_id, ident.device_of[node], CONSISTENCY_KIND)) == payload
        except crypto.CryptoError:
            ok = False
        if ok:
            agree.add(node)
    return agree


def client_unmask(state: HardenedClient, req: SignedUnmaskRequest, ident: Identity) -> tuple[HardenedClient, UnmaskShares]:
    """Answer only a request for the survivor set this device signed, and only if, for every node
    whose share it reveals, t members of that node's own neighbourhood signed the same set."""
    inner, me, t = state.inner, state.inner.node_id, state.inner.params.threshold
    p = inner.params
    if state.signed is None:
        raise ProtocolError("unmask request before this device signed a survivor set")
    if req.round_id != p.round_id or req.recipient != me:
        raise ProtocolError("unmask request for another round or node")
    surv = tuple(sorted(set(req.survivors)))
    if surv != state.signed:
        raise PeerVerificationError("unmask request names other survivors than the ones this device signed")
    agree = _agreeing(state, req, ident, surv)
    owners = sorted(inner.u2)  # the nodes whose shares this answer reveals (seed or key share)
    nbs = graph.neighbourhoods_of(p.node_ids, state.seed, owners, p.complete_up_to)
    for o in owners:
        got = len(agree & nbs[o])
        if got < t:
            raise PeerVerificationError(f"only {got} of node {o}'s neighbourhood signed this survivor set, "
                                        f"threshold {t}: refusing to reveal its share")
    # Who dropped, from this device's own view: never the server's word.
    dropped = tuple(sorted(inner.u2 - set(surv)))
    inner, ans = protocol.client_unmask(inner, UnmaskRequest(req.round_id, me, surv, dropped))
    return replace(state, inner=inner), ans


# --------------------------------------------------------------------------------------- server


@dataclass(frozen=True)
class EnrolledCert:
    """An enrolled device's certificate, parsed once when the registry is loaded: an advert whose
    certificate is byte-equal to it needs only its own signature checked, not a parse and the
    authority's signature again in every round."""

    blob: bytes
    keys: crypto.PublicKeys
    cert: authority.Certificate | None = None  # for its validity window, checked every round


def enrolled_certs(certs: Mapping[str, bytes]) -> dict[str, EnrolledCert]:
    """Device id -> its parsed certificate (``authority.Certificate.from_blob``; the authority's
    signature on each was checked when it was enrolled)."""
    out = {}
    for d, b in certs.items():
        c = authority.Certificate.from_blob(d, b)
        out[d] = EnrolledCert(bytes(b), c.keys, c)
    return out


@dataclass(frozen=True)
class HardenedServer:
    inner: protocol.ServerState
    entries: tuple[ListEntry, ...] = ()
    adverts: Mapping[int, SignedAdvertise] = field(default_factory=dict)
    signed_entries: Mapping[int, SignedEntry] = field(default_factory=dict)  # the adverts as relayed, built once
    seed: bytes = b""
    graph: Mapping[int, frozenset[int]] = field(default_factory=dict)  # derived, before any cut
    sigs: Mapping[int, bytes] = field(default_factory=dict)


def server_init(params: protocol.SecAggParams) -> HardenedServer:
    return HardenedServer(protocol.server_init(params))


def server_collect_adverts(state: HardenedServer, msgs: Iterable[SignedAdvertise], ident: Identity,
                           enrolled: Mapping[str, EnrolledCert] | Mapping[str, bytes] | None = None
                           ) -> tuple[HardenedServer, dict[int, AdvertList]]:
    """Keep adverts that verify (a certificate byte-equal to the enrolled one, when given, skips
    re-verifying it; pass ``enrolled_certs(...)`` to skip parsing it too) and fix the round's
    advert list: every counted node gets the same one."""
    p = state.inner.params
    good: dict[int, SignedAdvertise] = {}
    for m in msgs:
        if m.round_id != p.round_id or m.sender not in p.node_ids or m.sender in good:
            log.warning("ignoring advert from node %s (round %s)", m.sender, m.round_id)
            continue
        try:
            device = ident.device_of[m.sender]
            known = enrolled.get(device) if enrolled is not None else None
            if isinstance(known, bytes):
                c = authority.Certificate.from_blob(device, known)
                known = EnrolledCert(known, c.keys, c)
            if known is not None and known.blob == m.cert:
                # Its peers check the window too: an expired device counted here would void their round.
                why = known.cert.window_problem() if known.cert is not None else None
                if why:
                    raise PeerVerificationError(f"its certificate is {why}")
                payload = crypto.verify(m.sig, known.keys, aad=crypto.AssociatedData(p.round_id, device, ADVERT_KIND))
                if payload != _advert_payload(p.round_id, m.sender, m.c_pk, m.s_pk, m.commit):
                    raise PeerVerificationError("signed for other keys")
            else:
                check_advert(ident, p.round_id, m, m.sender)
        except (PeerVerificationError, crypto.CryptoError, ProtocolError) as e:
            log.warning("dropping node %d: its advert does not verify (%s)", m.sender, e)
            continue
        good[m.sender] = m
    if len(good) < p.threshold:
        raise protocol.SecAggAbort(f"{len(good)} verified adverts, threshold {p.threshold}")
    entries = tuple(ListEntry(n, digest(good[n]), good[n].commit) for n in sorted(good))
    return (replace(state, entries=entries, adverts=good, signed_entries={n: _entry_of(a) for n, a in good.items()}),
            {u: AdvertList(p.round_id, u, entries) for u in good})


def server_collect_reveals(state: HardenedServer, msgs: Iterable[SeedReveal]) -> tuple[HardenedServer, dict[int, SignedKeys]]:
    """Every listed node's contribution, checked against its commitment; then the graph, and each
    node its neighbourhood's signed adverts. A missing or wrong reveal raises ``SeedWithheld``."""
    p = state.inner.params
    got: dict[int, bytes] = {}
    for m in msgs:
        a = state.adverts.get(m.sender)
        if m.round_id != p.round_id or a is None or m.sender in got:
            log.warning("ignoring seed reveal from node %s (round %s)", m.sender, m.round_id)
            continue
        if commitment(p.round_id, m.sender, m.rho) != a.commit:
            log.warning("node %d revealed a contribution that does not open its commitment", m.sender)
            continue
        got[m.sender] = m.rho
    missing = set(state.adverts) - set(got)
    if missing:
        raise SeedWithheld(missing)
    rhos = tuple((n, got[n]) for n in sorted(got))
    seed = graph_seed(p.graph_seed, p.round_id, list_hash(state.entries), rhos)
    neighbours = graph.build(p.node_ids, seed, p.complete_up_to)
    inner = replace(state.inner, neighbours=neighbours)
    good = state.adverts
    plain = [protocol.AdvertiseKeys(p.round_id, n, a.c_pk, a.s_pk) for n, a in good.items()]  # type: ignore[attr-defined]
    inner, out = protocol.server_collect_keys(inner, plain)
    rel = _relayed(state)
    signed = {u: SignedKeys(p.round_id, u, rhos, tuple(rel[e.node] for e in nk.keys)) for u, nk in out.items()}
    return replace(state, inner=inner, seed=seed, graph=neighbours), signed


def _relayed(state: HardenedServer) -> Mapping[int, SignedEntry]:
    # Each advert is relayed to tens of devices: build its entry once (a state made by hand in a
    # test may lack them).
    return state.signed_entries or {n: _entry_of(a) for n, a in state.adverts.items()}


def server_collect_shares(state: HardenedServer, msgs):  # type: ignore[no-untyped-def]
    inner, out = protocol.server_collect_shares(state.inner, msgs)
    return replace(state, inner=inner), out


def server_collect_receipts(state: HardenedServer, msgs: Iterable[BundleReceipt]
                            ) -> tuple[HardenedServer, dict[int, MaskPeers]]:
    inner, out = protocol.server_collect_receipts(state.inner, msgs)
    return replace(state, inner=inner), out


def server_add_masked(state: HardenedServer, msg: MaskedInput) -> HardenedServer:
    if not state.inner.cut:
        raise ProtocolError("masked input before the bundle receipts were collected")
    return replace(state, inner=protocol.server_add_masked(state.inner, msg))


def server_request_consistency(state: HardenedServer) -> tuple[HardenedServer, dict[int, ConsistencyRequest]]:
    inner, _ = protocol.server_request_unmask(state.inner)  # checks thresholds and fixes U3
    lh = list_hash(state.entries)
    surv = tuple(sorted(inner.u3))
    return replace(state, inner=inner), {u: ConsistencyRequest(inner.params.round_id, u, surv, lh) for u in inner.u3}


def server_collect_consistency(state: HardenedServer, msgs: Iterable[ConsistencySig]
                               ) -> tuple[HardenedServer, dict[int, SignedUnmaskRequest]]:
    """Relay, to each survivor that signed, the signatures its shares' owners' neighbourhoods
    gave (its neighbours' neighbours), with the adverts of those it has not seen."""
    inner = state.inner
    sigs: dict[int, bytes] = {}
    for m in msgs:
        if m.round_id == inner.params.round_id and m.sender in inner.u3 and m.sender not in sigs:
            sigs[m.sender] = m.sig
    surv = tuple(sorted(inner.u3))
    dropped = tuple(sorted(inner.u2 - inner.u3))
    signed = frozenset(sigs)
    g = state.graph or inner.neighbours
    rel = _relayed(state)
    pairs = {v: (v, sigs[v]) for v in sorted(sigs)}  # one tuple per signer, shared by every relay
    out = {}
    for u in sigs:
        mine = g[u]
        reach = signed if len(mine) == len(inner.params.node_ids) else frozenset().union(*(g[o] for o in mine)) & signed
        order = sorted(reach)
        out[u] = SignedUnmaskRequest(inner.params.round_id, u, surv, dropped, tuple(pairs[v] for v in order),
                                     tuple(rel[v] for v in order if v not in mine))
    # Who did not sign gets no unmask request: only signers are asked for shares.
    return replace(state, sigs=sigs), out


def server_unmask(state: HardenedServer, msgs: Iterable[UnmaskShares]) -> protocol.AggregateResult:
    return protocol.server_unmask(state.inner, msgs)
