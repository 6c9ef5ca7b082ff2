"""SecAgg+ against an aggregator that deviates: certified, signed key adverts, a neighbour graph
the aggregator cannot steer once it has seen the adverts, and Bonawitz et al.'s consistency check.

What each addition stops (attacks of issue 9):

- Key substitution. Every ``SignedAdvertise`` carries its sender's certificate from the fleet
  authority (``shared.authority``, not the aggregator's key) and a signature, with the certified
  key, over (round, node, c_pk, s_pk). A device checks every neighbour's advert against the pinned
  authority key and the device id the signed round spec gives that node; one failure and it
  refuses the round. The aggregator cannot forge a participant either: it has no certificate.
- Steering the graph. The graph no longer comes from a seed the aggregator picks: it derives from
  the spec's seed *and* the digests of every advert the round counts (``graph_seed``), which the
  aggregator only knows once the devices' fresh keys are in. Every device gets the whole digest
  list, checks that its own advert is in it, and recomputes its neighbourhood.
- A bad share bundle. Each device opens its neighbours' bundles before training and sends a
  receipt naming those that fail; the server cuts those pairs and tells each device whom to mask
  with (``MaskPeers``), so a device that sends garbage costs its own edges, not the round.
- Equivocation about who dropped. Before unmasking, every survivor signs (round, hash of the
  digest list, survivor set) once; a device answers an unmask request only when at least t of
  its neighbours signed that same set, and it works out who dropped from its own view. With
  t > k/2 (enforced in ``SecAggParams``) two different sets cannot both gather t honest
  signatures in one neighbourhood.

The stage functions wrap the semi-honest ones in ``protocol`` (same shares, same masks), so the
sum, the dropout recovery and the streaming accumulator are unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from shared import authority, crypto
from shared.errors import ProtocolError
from shared.secagg import graph, protocol
from shared.secagg.messages import (BundleReceipt, ConsistencyRequest, ConsistencySig, ForwardedShares, KeyEntry,
                                    MaskedInput, MaskPeers, NeighbourKeys, SignedAdvertise, SignedEntry, SignedKeys,
                                    SignedUnmaskRequest, UnmaskRequest, UnmaskShares, encode)

__all__ = ["ConsistencyRequest", "ConsistencySig", "Identity", "PeerVerificationError", "SignedAdvertise", "SignedKeys",
           "SignedUnmaskRequest", "client_advertise", "client_consistency", "client_mask", "client_open_shares", "client_share_keys",
           "client_unmask", "server_add_masked", "server_collect_adverts", "server_collect_consistency",
           "server_collect_receipts", "server_collect_shares", "server_init", "server_request_consistency", "server_unmask"]

log = logging.getLogger(__name__)

_GRAPH_LABEL = b"fl-minillm/secagg/v2/graph"
ADVERT_KIND = "secagg_advert"
CONSISTENCY_KIND = "secagg_consistency"


class PeerVerificationError(ProtocolError):
    """A peer's advert, certificate or signature does not check out: the round is refused."""


@dataclass(frozen=True)
class Identity:
    """Who the round's nodes are, and this party's signing means.

    device_of: node -> device id, from the signed round spec (participants and node ids).
    authority: the fleet authority's public keys, pinned.
    keys, cert: a device's own long-term keys and certificate; None on the aggregator.
    """

    device_of: Mapping[int, str]
    authority: crypto.PublicKeys
    keys: crypto.DeviceKeys | None = None
    cert: bytes = b""


def _advert_payload(round_id: int, node: int, c_pk: bytes, s_pk: bytes) -> bytes:
    return b"adv" + struct.pack(">QI", round_id, node) + c_pk + s_pk


def _consistency_payload(round_id: int, list_hash: bytes, survivors: Iterable[int]) -> bytes:
    ids = sorted(survivors)
    return b"con" + struct.pack(">Q", round_id) + list_hash + struct.pack(f">I{len(ids)}I", len(ids), *ids)


def digest(adv: SignedAdvertise) -> bytes:
    return hashlib.sha256(encode(adv)).digest()


def list_hash(digests: Iterable[tuple[int, bytes]]) -> bytes:
    h = hashlib.sha256(_GRAPH_LABEL)
    for node, d in digests:
        h.update(struct.pack(">I", node) + d)
    return h.digest()


def graph_seed(spec_seed: bytes, round_id: int, digests: Iterable[tuple[int, bytes]]) -> bytes:
    """The round's graph seed: the spec's, bound to every counted advert."""
    return hashlib.sha256(_GRAPH_LABEL + spec_seed + struct.pack(">Q", round_id) + list_hash(digests)).digest()


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
    if payload != _advert_payload(round_id, node, e.c_pk, e.s_pk):
        raise PeerVerificationError(f"advert of node {node} ({device}) is signed for other keys")
    return keys


# --------------------------------------------------------------------------------------- client


@dataclass(frozen=True)
class HardenedClient:
    inner: protocol.ClientState
    advert: SignedAdvertise
    list_hash: bytes = b""
    peer_sign: Mapping[int, crypto.PublicKeys] = field(default_factory=dict)
    signed: tuple[int, ...] | None = None  # the survivor set this device signed (once a round)


def client_advertise(params: protocol.SecAggParams, node_id: int, ident: Identity) -> tuple[HardenedClient, SignedAdvertise]:
    if ident.keys is None or not ident.cert:
        raise ProtocolError("a hardened round needs this device's keys and certificate")
    inner, adv = protocol.client_advertise(params, node_id)
    device = ident.device_of[node_id]
    sig = crypto.sign(_advert_payload(params.round_id, node_id, adv.c_pk, adv.s_pk), ident.keys,
                      aad=crypto.AssociatedData(params.round_id, device, ADVERT_KIND))
    signed = SignedAdvertise(params.round_id, node_id, adv.c_pk, adv.s_pk, ident.cert, sig)
    return HardenedClient(inner, signed), signed


def client_share_keys(state: HardenedClient, msg: SignedKeys, ident: Identity):  # type: ignore[no-untyped-def]
    """Verify the digest list and every neighbour's advert, then share keys as usual."""
    p, me = state.inner.params, state.inner.node_id
    if msg.round_id != p.round_id or msg.recipient != me:
        raise ProtocolError(f"signed keys for round {msg.round_id}/node {msg.recipient} reached {p.round_id}/{me}")
    nodes = [n for n, _ in msg.digests]
    if nodes != sorted(set(nodes)) or not set(nodes) <= set(p.node_ids):
        raise PeerVerificationError("advert digest list is not a sorted subset of the cohort")
    if dict(msg.digests).get(me) != digest(state.advert):
        raise PeerVerificationError("this device's own advert is missing from the digest list, or altered")
    seed = graph_seed(p.graph_seed, p.round_id, msg.digests)
    nb = graph.build(p.node_ids, seed)[me]
    want = nb & set(nodes)
    got = {e.node: e for e in msg.keys}
    if len(got) != len(msg.keys) or set(got) != want:
        raise PeerVerificationError(f"server sent adverts of {sorted(got)[:5]}..., the derived neighbourhood is "
                                    f"{sorted(want)[:5]}...")
    listed = dict(msg.digests)
    signers: dict[int, crypto.PublicKeys] = {}
    for node, e in got.items():
        if digest(SignedAdvertise(p.round_id, node, e.c_pk, e.s_pk, e.cert, e.sig)) != listed[node]:
            raise PeerVerificationError(f"advert of node {node} differs from its listed digest")
        signers[node] = check_advert(ident, p.round_id, e, node)
    inner = replace(state.inner, neighbours=nb)
    plain = NeighbourKeys(p.round_id, me, tuple(KeyEntry(n, got[n].c_pk, got[n].s_pk) for n in sorted(got)))
    inner, out = protocol.client_share_keys(inner, plain)
    return replace(state, inner=inner, list_hash=list_hash(msg.digests), peer_sign=signers), out


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
    assert ident.keys is not None
    device = ident.device_of[me]
    sig = crypto.sign(_consistency_payload(req.round_id, req.list_hash, surv), ident.keys,
                      aad=crypto.AssociatedData(req.round_id, device, CONSISTENCY_KIND))
    return replace(state, signed=surv), ConsistencySig(req.round_id, me, sig)


def client_unmask(state: HardenedClient, req: SignedUnmaskRequest, ident: Identity) -> tuple[HardenedClient, UnmaskShares]:
    """Answer only a request for the survivor set this device signed, backed by t neighbours."""
    inner, me, t = state.inner, state.inner.node_id, state.inner.params.threshold
    if state.signed is None:
        raise ProtocolError("unmask request before this device signed a survivor set")
    surv = tuple(sorted(set(req.survivors)))
    if surv != state.signed:
        raise PeerVerificationError("unmask request names other survivors than the ones this device signed")
    payload = _consistency_payload(req.round_id, state.list_hash, surv)
    agree = set()
    for node, sig in req.sigs:
        pk = state.peer_sign.get(node)
        if pk is None or node not in surv or node in agree:
            continue
        try:
            ok = crypto.verify(sig, pk, aad=crypto.AssociatedData(req.round_id, ident.device_of[node], CONSISTENCY_KIND)) == payload
        except crypto.CryptoError:
            ok = False
        if ok:
            agree.add(node)
    if len(agree) < t:
        raise PeerVerificationError(f"only {len(agree)} neighbours signed this survivor set, threshold {t}: refusing")
    # Who dropped, from this device's own view: never the server's word.
    dropped = tuple(sorted(inner.u2 - set(surv)))
    inner, ans = protocol.client_unmask(inner, UnmaskRequest(req.round_id, me, surv, dropped))
    return replace(state, inner=inner), ans


# --------------------------------------------------------------------------------------- server


@dataclass(frozen=True)
class HardenedServer:
    inner: protocol.ServerState
    digests: tuple[tuple[int, bytes], ...] = ()
    adverts: Mapping[int, SignedAdvertise] = field(default_factory=dict)
    sigs: Mapping[int, bytes] = field(default_factory=dict)


def server_init(params: protocol.SecAggParams) -> HardenedServer:
    return HardenedServer(protocol.server_init(params))


def server_collect_adverts(state: HardenedServer, msgs: Iterable[SignedAdvertise], ident: Identity,
                           enrolled: Mapping[str, bytes] | None = None) -> tuple[HardenedServer, dict[int, SignedKeys]]:
    """Keep adverts that verify (a certificate byte-equal to the enrolled one, when given, skips
    re-verifying it), derive the graph from their digests, send each node its neighbourhood."""
    p = state.inner.params
    good: dict[int, SignedAdvertise] = {}
    for m in msgs:
        if m.round_id != p.round_id or m.sender not in p.node_ids or m.sender in good:
            log.warning("ignoring advert from node %s (round %s)", m.sender, m.round_id)
            continue
        try:
            device = ident.device_of[m.sender]
            if enrolled is not None and enrolled.get(device) == m.cert:
                keys = authority.Certificate.from_blob(device, m.cert).keys
                payload = crypto.verify(m.sig, keys, aad=crypto.AssociatedData(p.round_id, device, ADVERT_KIND))
                if payload != _advert_payload(p.round_id, m.sender, m.c_pk, m.s_pk):
                    raise PeerVerificationError("signed for other keys")
            else:
                check_advert(ident, p.round_id, m, m.sender)
        except (PeerVerificationError, crypto.CryptoError, ProtocolError) as e:
            log.warning("dropping node %d: its advert does not verify (%s)", m.sender, e)
            continue
        good[m.sender] = m
    digests = tuple((n, digest(good[n])) for n in sorted(good))
    seed = graph_seed(p.graph_seed, p.round_id, digests)
    neighbours = graph.build(p.node_ids, seed)
    inner = replace(state.inner, neighbours=neighbours)
    plain = [protocol.AdvertiseKeys(p.round_id, n, a.c_pk, a.s_pk) for n, a in good.items()]  # type: ignore[attr-defined]
    inner, out = protocol.server_collect_keys(inner, plain)
    signed = {u: SignedKeys(p.round_id, u, digests, tuple(SignedEntry(e.node, e.c_pk, e.s_pk, good[e.node].cert,
                                                                     good[e.node].sig) for e in nk.keys))
              for u, nk in out.items()}
    return replace(state, inner=inner, digests=digests, adverts=good), signed


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
    lh = list_hash(state.digests)
    surv = tuple(sorted(inner.u3))
    return replace(state, inner=inner), {u: ConsistencyRequest(inner.params.round_id, u, surv, lh) for u in inner.u3}


def server_collect_consistency(state: HardenedServer, msgs: Iterable[ConsistencySig]
                               ) -> tuple[HardenedServer, dict[int, SignedUnmaskRequest]]:
    """Relay, to each survivor that signed, its neighbours' signatures (they check them)."""
    inner = state.inner
    sigs: dict[int, bytes] = {}
    for m in msgs:
        if m.round_id == inner.params.round_id and m.sender in inner.u3 and m.sender not in sigs:
            sigs[m.sender] = m.sig
    surv = tuple(sorted(inner.u3))
    dropped = tuple(sorted(inner.u2 - inner.u3))
    out = {u: SignedUnmaskRequest(inner.params.round_id, u, surv, dropped,
                                  tuple((v, sigs[v]) for v in sorted(inner.neighbours[u] & set(sigs))))
           for u in sigs}
    # Who did not sign gets no unmask request: only signers are asked for shares.
    inner = replace(inner, u3=inner.u3)
    return replace(state, inner=inner, sigs=sigs), out


def server_unmask(state: HardenedServer, msgs: Iterable[UnmaskShares]) -> protocol.AggregateResult:
    return protocol.server_unmask(state.inner, msgs)
