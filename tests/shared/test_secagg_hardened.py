"""The hardened SecAgg+ round against an aggregator that deviates (issue 9's attacks, pure protocol).

Each test plays the aggregator itself, driving the devices' stage functions directly, and tries
what a malicious aggregator tried on the semi-honest round: substitute a peer's keys, invent a
participant, steer the graph, tell survivors different stories about who dropped.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from shared import authority, crypto
from shared.errors import ConfigError, ProtocolError
from shared.secagg import graph, hardened, messages, protocol, quant
from shared.secagg.hardened import Identity, PeerVerificationError

N, T, DIM = 7, 5, 64  # complete graph of 7; t = 5 > 7/2
AUTH = crypto.generate_keys()


def _fleet(n: int = N, t: int = T, round_id: int = 3, complete_up_to: int | None = None):
    p = protocol.SecAggParams(round_id=round_id, node_ids=tuple(range(10, 10 + n)), threshold=t, dim=DIM, graph_seed=b"S" * 32,
                              complete_up_to=complete_up_to)
    device_of = {node: f"dev-{node}" for node in p.node_ids}
    keys = {node: crypto.generate_keys() for node in p.node_ids}
    certs = {node: authority.certify(device_of[node], keys[node].public, AUTH).blob for node in p.node_ids}
    idents = {node: Identity(device_of, AUTH.public, keys[node], certs[node]) for node in p.node_ids}
    server_ident = Identity(device_of, AUTH.public)
    return p, idents, server_ident


def _roundtrip(m):  # type: ignore[no-untyped-def]
    out = messages.decode(messages.encode(m))
    assert out == m
    return out


def _to_keys(p, idents, server_ident, absent=()):  # type: ignore[no-untyped-def]
    """Adverts, the advert list, the reveals: the round up to each device's SignedKeys."""
    clients, adverts = {}, []
    for u in p.node_ids:
        if u in absent:
            continue
        clients[u], adv = hardened.client_advertise(p, u, idents[u])
        adverts.append(_roundtrip(adv))
    srv = hardened.server_init(p)
    srv, lists = hardened.server_collect_adverts(srv, adverts, server_ident)
    reveals = []
    for u, msg in lists.items():
        clients[u], rv = hardened.client_reveal(clients[u], _roundtrip(msg), idents[u])
        reveals.append(_roundtrip(rv))
    srv, keys = hardened.server_collect_reveals(srv, reveals)
    return clients, srv, keys, adverts


def _to_masked(p, idents, server_ident, inputs, tamper=None):  # type: ignore[no-untyped-def]
    """Run the round up to the masked inputs; ``tamper`` may rewrite one device's ShareKeys, and a
    device missing from ``inputs`` sends its receipt but drops before masking."""
    clients, srv, keys, _ = _to_keys(p, idents, server_ident)
    shares = []
    for u, msg in keys.items():
        clients[u], out = hardened.client_share_keys(clients[u], _roundtrip(msg), idents[u])
        shares.append(tamper(out) if tamper else out)
    srv, fwd = hardened.server_collect_shares(srv, shares)
    receipts = []
    for u, msg in fwd.items():
        clients[u], rc = hardened.client_open_shares(clients[u], _roundtrip(msg))
        receipts.append(_roundtrip(rc))
    srv, peers = hardened.server_collect_receipts(srv, receipts)
    for u, msg in peers.items():
        if u in inputs:
            clients[u], y = hardened.client_mask(clients[u], _roundtrip(msg), inputs[u])
            srv = hardened.server_add_masked(srv, y)
    return clients, srv, keys


def _finish(p, clients, srv, idents):  # type: ignore[no-untyped-def]
    srv, req = hardened.server_request_consistency(srv)
    sigs = []
    for u, r in req.items():
        clients[u], sg = hardened.client_consistency(clients[u], _roundtrip(r), idents[u])
        sigs.append(_roundtrip(sg))
    srv, unmask = hardened.server_collect_consistency(srv, sigs)
    answers = []
    for u, r in unmask.items():
        clients[u], a = hardened.client_unmask(clients[u], _roundtrip(r), idents[u])
        answers.append(_roundtrip(a))
    return hardened.server_unmask(srv, answers)


def _garble(bad: int, victims=None):  # type: ignore[no-untyped-def]
    """A device that seals garbage (right length, wrong bytes) to ``victims`` (default: everyone)."""
    def tamper(m):  # type: ignore[no-untyped-def]
        if m.sender != bad:
            return m
        return replace(m, sealed=tuple(messages.Sealed(s.peer, bytes(len(s.blob))) if victims is None or s.peer in victims
                                       else s for s in m.sealed))
    return tamper


def _inputs(p, seed: int = 0):  # type: ignore[no-untyped-def]
    cfg = quant.QuantConfig(clip=1.0, n_summands=len(p.node_ids))
    rng = np.random.default_rng(seed)
    floats = {u: rng.uniform(-1, 1, DIM) for u in p.node_ids}
    return cfg, floats, {u: quant.quantize(v, cfg, seed + i) for i, (u, v) in enumerate(floats.items())}


def test_honest_hardened_round_gives_the_sum_with_a_dropout() -> None:
    p, idents, si = _fleet()
    cfg, floats, qs = _inputs(p)
    clients, srv, _ = _to_masked(p, idents, si, qs)
    srv, req = hardened.server_request_consistency(srv)
    sigs = []
    late = p.node_ids[-1]  # survives masking, then never signs nor unmasks
    for u, r in req.items():
        if u == late:
            continue
        clients[u], s = hardened.client_consistency(clients[u], _roundtrip(r), idents[u])
        sigs.append(_roundtrip(s))
    srv, unmask = hardened.server_collect_consistency(srv, sigs)
    assert late not in unmask
    answers = []
    for u, r in unmask.items():
        clients[u], a = hardened.client_unmask(clients[u], _roundtrip(r), idents[u])
        answers.append(a)
    res = hardened.server_unmask(srv, answers)
    got = quant.dequantize_sum(res.total, cfg, len(res.contributors))
    np.testing.assert_allclose(got, sum(floats.values()), atol=quant.error_bound(cfg, len(p.node_ids)))


def test_key_substitution_is_detected_and_the_round_refused() -> None:
    p, idents, si = _fleet()
    target, victim_peer = p.node_ids[0], p.node_ids[1]
    evil_c, evil_s = protocol._crypto.new_keypair()[1], protocol._crypto.new_keypair()[1]  # noqa: SLF001
    clients, srv, keys, adverts = _to_keys(p, idents, si)
    msg = keys[target]
    forged = tuple(replace(e, c_pk=evil_c, s_pk=evil_s) if e.node == victim_peer else e for e in msg.keys)
    with pytest.raises(PeerVerificationError):
        hardened.client_share_keys(clients[target], replace(msg, keys=forged), idents[target])
    # Keep the advert list consistent with the forged entry, as a careful attacker would: the list
    # then carries a digest of an advert whose signature is over other keys.
    p2, idents2, si2 = _fleet(round_id=4)
    clients2, adverts2 = {}, []
    for u in p2.node_ids:
        clients2[u], adv = hardened.client_advertise(p2, u, idents2[u])
        adverts2.append(adv)
    srv2, lists = hardened.server_collect_adverts(hardened.server_init(p2), adverts2, si2)
    real = next(a for a in adverts2 if a.sender == victim_peer)
    fake_adv = replace(real, c_pk=evil_c, s_pk=evil_s)
    entries = tuple(replace(e, digest=hardened.digest(fake_adv)) if e.node == victim_peer else e for e in lists[target].entries)
    clients2[target], rv = hardened.client_reveal(clients2[target], replace(lists[target], entries=entries), idents2[target])
    reveals = [rv] + [hardened.client_reveal(clients2[u], lists[u], idents2[u])[1] for u in p2.node_ids if u != target]
    srv2, keys2 = hardened.server_collect_reveals(srv2, reveals)
    forged2 = tuple(replace(e, c_pk=evil_c, s_pk=evil_s) if e.node == victim_peer else e for e in keys2[target].keys)
    with pytest.raises(PeerVerificationError, match="signed for other keys"):
        hardened.client_share_keys(clients2[target], replace(keys2[target], keys=forged2), idents2[target])


def test_a_forged_participant_is_rejected() -> None:
    """The aggregator makes up a node's advert with keys of its own and a self-made certificate."""
    p, idents, si = _fleet()
    mallory = crypto.generate_keys()
    node = p.node_ids[2]
    fake_cert = authority.certify(si.device_of[node], mallory.public, mallory).blob  # not the authority's signature
    c_pk, s_pk = protocol._crypto.new_keypair()[1], protocol._crypto.new_keypair()[1]  # noqa: SLF001
    commit = hardened.commitment(p.round_id, node, bytes(32))
    sig = crypto.sign(hardened._advert_payload(p.round_id, node, c_pk, s_pk, commit), mallory,  # noqa: SLF001
                      aad=crypto.AssociatedData(p.round_id, si.device_of[node], hardened.ADVERT_KIND))
    forged = messages.SignedAdvertise(p.round_id, node, c_pk, s_pk, commit, fake_cert, sig)
    with pytest.raises(PeerVerificationError):
        hardened.check_advert(idents[p.node_ids[0]], p.round_id, forged, node)
    # A real device's certificate for the wrong node is refused too.
    stolen = replace(forged, cert=idents[p.node_ids[3]].cert)
    with pytest.raises(PeerVerificationError):
        hardened.check_advert(idents[p.node_ids[0]], p.round_id, stolen, node)
    # An honest aggregator drops such an advert instead of relaying it.
    honest = []
    for u in p.node_ids:
        if u != node:
            honest.append(hardened.client_advertise(p, u, idents[u])[1])
    srv, lists = hardened.server_collect_adverts(hardened.server_init(p), honest + [forged], si)
    assert node not in {e.node for e in srv.entries} and node not in lists
    # With the enrolled certificates parsed once (the aggregator's fast path), the same holds: a
    # certificate that is not the enrolled one, or a signature by another key, is dropped.
    certs = {si.device_of[u]: idents[u].cert for u in p.node_ids}
    for enrolled in (hardened.enrolled_certs(certs), certs):
        for bad in (forged, replace(forged, cert=certs[si.device_of[node]])):
            srv, lists = hardened.server_collect_adverts(hardened.server_init(p), honest + [bad], si, enrolled)
            assert node not in lists and len(lists) == len(honest)
    ok = hardened.client_advertise(p, node, idents[node])[1]
    srv, lists = hardened.server_collect_adverts(hardened.server_init(p), honest + [ok], si, hardened.enrolled_certs(certs))
    assert node in lists and srv.signed_entries[node] == hardened._entry_of(ok)  # noqa: SLF001


def test_the_graph_follows_the_reveals_not_the_aggregator() -> None:
    """With a sparse graph the server cannot hand a device the neighbourhood of its own seed, nor
    re-draw the graph by leaving the device's own advert out."""
    p, idents, si = _fleet(n=40, t=protocol.default_threshold(40, complete_up_to=0), complete_up_to=0)
    clients, srv, keys, adverts = _to_keys(p, idents, si)
    steered = graph.build(p.node_ids, p.graph_seed, p.complete_up_to)  # what the spec's seed alone would give
    target = p.node_ids[0]
    assert srv.graph[target] != steered[target]
    by_node = {a.sender: a for a in adverts}
    bad = replace(keys[target], keys=tuple(hardened._entry_of(by_node[n]) for n in sorted(steered[target])))  # noqa: SLF001
    with pytest.raises(PeerVerificationError, match="neighbourhood"):
        hardened.client_share_keys(clients[target], bad, idents[target])
    hardened.client_share_keys(clients[target], keys[target], idents[target])  # the honest one passes
    # Dropping the target's own advert from the list (to re-draw the graph without it) is caught.
    p2, idents2, si2 = _fleet(n=40, t=protocol.default_threshold(40, complete_up_to=0), complete_up_to=0, round_id=9)
    c2, adv2 = hardened.client_advertise(p2, target, idents2[target])
    others = [hardened.client_advertise(p2, u, idents2[u])[1] for u in p2.node_ids if u != target]
    _, lists = hardened.server_collect_adverts(hardened.server_init(p2), others, si2)
    with pytest.raises(PeerVerificationError, match="own advert"):
        hardened.client_reveal(c2, replace(lists[others[0].sender], recipient=target), idents2[target])


def test_equivocating_unmask_requests_get_no_answer() -> None:
    """The attack of issue 9: tell some survivors that u survived (they reveal b_u shares) and the
    others that u dropped (they reveal s_u shares). Each device signs only what it was told, and
    answers only with t neighbours' signatures on that same set: one side, at most, can answer."""
    p, idents, si = _fleet()
    _, _, qs = _inputs(p)
    clients, srv, _ = _to_masked(p, idents, si, qs)
    srv, req = hardened.server_request_consistency(srv)
    u = p.node_ids[0]
    others = [v for v in p.node_ids if v != u]
    told_alive, told_dropped = others[:3], others[3:]
    with_u = tuple(sorted(p.node_ids))
    without_u = tuple(sorted(others))
    sigs = {}
    for v in told_alive:
        clients[v], s = hardened.client_consistency(clients[v], replace(req[v], survivors=with_u), idents[v])
        sigs[v] = s.sig
    for v in told_dropped:
        clients[v], s = hardened.client_consistency(clients[v], replace(req[v], survivors=without_u), idents[v])
        sigs[v] = s.sig
    answered = {"alive": 0, "dropped": 0}
    for v in others:
        surv = with_u if v in told_alive else without_u
        r = messages.SignedUnmaskRequest(p.round_id, v, surv, tuple(sorted(set(p.node_ids) - set(surv))),
                                         tuple(sorted(sigs.items())))
        try:
            hardened.client_unmask(clients[v], r, idents[v])
            answered["alive" if v in told_alive else "dropped"] += 1
        except PeerVerificationError:
            pass
    assert answered == {"alive": 0, "dropped": 0}  # 3 and 3 signatures: neither reaches t = 5
    # Nor can a device be asked to sign twice (the aggregator's other way to collect signatures).
    with pytest.raises(ProtocolError, match="already signed"):
        hardened.client_consistency(clients[others[0]], req[others[0]], idents[others[0]])


def test_a_threshold_below_the_bound_is_refused_by_devices() -> None:
    with pytest.raises(ConfigError, match="more than half"):
        protocol.SecAggParams(round_id=1, node_ids=tuple(range(7)), threshold=3, dim=4, graph_seed=bytes(32))


def test_hardened_messages_round_trip_and_reject_junk() -> None:
    from shared.errors import TruncatedError

    p, idents, si = _fleet()
    _, adv = hardened.client_advertise(p, p.node_ids[0], idents[p.node_ids[0]])
    data = messages.encode(adv)
    assert messages.decode(data) == adv
    with pytest.raises(TruncatedError):
        messages.decode(data[:-1])


def test_a_bad_bundle_sender_drops_alone_and_the_round_completes() -> None:
    """Issue 9 item 5: garbage bundles to every neighbour used to fail every neighbour's round
    after training. Now the receipts cut its pairs before anyone masks; it leaves, the rest sum."""
    p, idents, si = _fleet()
    cfg, floats, qs = _inputs(p)
    bad = p.node_ids[2]
    clients, srv, _ = _to_masked(p, idents, si, qs, tamper=_garble(bad))
    assert bad not in srv.inner.u2 and len(srv.inner.u2) == len(p.node_ids) - 1
    # Its masked input, sent anyway, is not counted.
    y = messages.MaskedInput(p.round_id, bad, quant.quantize(floats[bad], cfg, 99).astype("<u4").tobytes())
    srv = hardened.server_add_masked(srv, y)
    res = _finish(p, clients, srv, idents)
    assert bad not in res.contributors and len(res.contributors) == len(p.node_ids) - 1
    got = quant.dequantize_sum(res.total, cfg, len(res.contributors))
    want = sum(v for u, v in floats.items() if u != bad)
    np.testing.assert_allclose(got, want, atol=quant.error_bound(cfg, len(p.node_ids)))


def test_one_bad_bundle_cuts_one_pair_and_dropout_recovery_follows_the_cut_graph() -> None:
    """Garbage to one neighbour only: that pair is cut, both stay in, and a device that drops after
    its receipt is still recovered over the cut graph; the sum is exact."""
    p, idents, si = _fleet()
    cfg, floats, qs = _inputs(p)
    bad, victim, late = p.node_ids[0], p.node_ids[1], p.node_ids[4]
    clients, srv, _ = _to_masked(p, idents, si, {u: q for u, q in qs.items() if u != late},
                                 tamper=_garble(bad, {victim}))
    assert {bad, victim} <= srv.inner.u2 and victim not in srv.inner.neighbours[bad]
    assert clients[victim].inner.u2 == frozenset(p.node_ids) - {bad}
    res = _finish(p, clients, srv, idents)
    assert set(res.contributors) == set(p.node_ids) - {late}
    got = quant.dequantize_sum(res.total, cfg, len(res.contributors))
    want = sum(v for u, v in floats.items() if u != late)
    np.testing.assert_allclose(got, want, atol=quant.error_bound(cfg, len(p.node_ids)))


def test_mask_peers_from_a_deviating_server_are_refused() -> None:
    """The server cannot make a device mask with peers whose shares it lacks, nor with too few
    (a device masked with nobody would be unmasked by its own b shares alone)."""
    p, idents, si = _fleet()
    _, _, qs = _inputs(p)
    bad, victim = p.node_ids[0], p.node_ids[1]
    clients, srv, _ = _to_masked(p, idents, si, {}, tamper=_garble(bad, {victim}))
    st = clients[victim]
    with pytest.raises(ProtocolError, match="does not hold"):
        hardened.client_mask(st, messages.MaskPeers(p.round_id, victim, tuple(sorted(set(p.node_ids) - {victim}))),
                             qs[victim])
    with pytest.raises(protocol.SecAggAbort):
        hardened.client_mask(st, messages.MaskPeers(p.round_id, victim, (p.node_ids[2],)), qs[victim])


def test_an_advert_with_an_expired_certificate_is_refused() -> None:
    """A device whose certificate ran out cannot take part: its peers refuse its advert, naming why
    (issue 26). Same authority, same keys, only the signed validity window is over."""
    import time

    p, idents, si = _fleet()
    node = p.node_ids[1]
    old = authority.certify(si.device_of[node], idents[node].keys.public, AUTH, days=1, not_before=time.time() - 3 * 86400)
    idents[node] = replace(idents[node], cert=old.blob)
    _, advert = hardened.client_advertise(p, node, idents[node])
    with pytest.raises(PeerVerificationError, match="expired at"):
        hardened.check_advert(idents[p.node_ids[0]], p.round_id, advert, node)
    ok = p.node_ids[2]
    _, good = hardened.client_advertise(p, ok, idents[ok])
    hardened.check_advert(idents[p.node_ids[0]], p.round_id, good, ok)  # the control: a current certificate passes


def test_a_certificate_window_cannot_be_edited_outside_the_signature() -> None:
    import time

    cert = authority.certify("dev-1", AUTH.public, AUTH, days=1, not_before=time.time() - 3 * 86400)
    stretched = replace(cert, not_after=time.time() + 86400)  # what a holder would like it to say
    with pytest.raises(crypto.CryptoError, match="window other than"):
        authority.verify(stretched, AUTH.public, "dev-1")
    assert authority.Certificate.from_blob("dev-1", cert.blob).not_after == cert.not_after  # read from the signed payload


def test_the_aggregator_drops_an_advert_whose_enrolled_certificate_expired() -> None:
    """The fast path (a certificate byte-equal to the enrolled one) checks the window too."""
    import time

    p, idents, si = _fleet()
    node = p.node_ids[1]
    old = authority.certify(si.device_of[node], idents[node].keys.public, AUTH, days=1, not_before=time.time() - 3 * 86400)
    idents[node] = replace(idents[node], cert=old.blob)
    adverts = [hardened.client_advertise(p, u, idents[u])[1] for u in p.node_ids]
    enrolled = hardened.enrolled_certs({si.device_of[u]: idents[u].cert for u in p.node_ids})
    srv, lists = hardened.server_collect_adverts(hardened.server_init(p), adverts, si, enrolled)
    assert node not in lists and {e.node for e in srv.entries} == set(p.node_ids) - {node}
