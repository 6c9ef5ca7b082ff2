"""What a malicious aggregator does with the shares it collects: the tools the attack tests share.

The attack tests play the aggregator (alone, or with colluding devices) against honest devices'
real stage functions. When an attack gets t shares of a node's self-mask seed and every pairwise
key its input is masked with, ``recover_input`` strips the masks: the test then compares the
result with the node's true input, so an attack that works is seen to work.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from shared.secagg import _crypto, hardened, messages, prg, shamir
from shared.secagg.hardened import HardenedServer
from shared.secagg.messages import SignedUnmaskRequest, UnmaskShares


def rebuild(shares: Mapping[int, bytes], t: int) -> bytes | None:
    """A Shamir secret from t or more shares (holder -> share bytes), or None below t."""
    if len(shares) < t:
        return None
    return shamir.reconstruct([shamir.Share.from_bytes(s) for s in shares.values()], t)


def gather(answers: Iterable[UnmaskShares]) -> tuple[dict[int, dict[int, bytes]], dict[int, dict[int, bytes]]]:
    """Per owner, the seed shares and the key shares the answers revealed (owner -> holder -> share)."""
    seeds: dict[int, dict[int, bytes]] = {}
    keys: dict[int, dict[int, bytes]] = {}
    for a in answers:
        for o in a.seed_shares:
            seeds.setdefault(o.owner, {})[a.sender] = o.share
        for o in a.key_shares:
            keys.setdefault(o.owner, {})[a.sender] = o.share
    return seeds, keys


def recover_input(y: bytes, node: int, b_seed: bytes, round_id: int, peers: Mapping[int, bytes], s_pk: Mapping[int, bytes]
                  ) -> np.ndarray:
    """Strip node's masks from its masked input y: its self-mask from b_seed, and each pairwise
    mask from one of the pair's mask keys (``peers``: peer -> the s^SK of the peer or of the node)."""
    acc = np.frombuffer(y, dtype="<u4").copy()
    prg.add_mask(acc, b_seed, -1)
    for v, sk in peers.items():
        # mask_seed is symmetric: DH(s_u^SK, s_v^PK) == DH(s_v^SK, s_u^PK)
        other = s_pk[node] if _crypto.public_from_private(sk) == s_pk[v] else s_pk[v]
        prg.add_mask(acc, _crypto.mask_seed(sk, other, round_id), -(1 if node < v else -1))
    return acc


def signed_request(srv: HardenedServer, recipient: int, survivors: Iterable[int], sigs: Mapping[int, bytes]) -> SignedUnmaskRequest:
    """The unmask request an aggregator would send ``recipient`` for a survivor set of its choosing,
    with the signatures it holds on that set and the adverts of the signers the recipient has not seen."""
    surv = tuple(sorted(survivors))
    p = srv.inner.params
    g = srv.graph
    mine = g[recipient]
    reach = frozenset().union(*(g[o] for o in mine)) & frozenset(sigs)
    return SignedUnmaskRequest(p.round_id, recipient, surv, tuple(sorted(set(p.node_ids) - set(surv))),
                               tuple((v, sigs[v]) for v in sorted(reach)),
                               tuple(hardened._entry_of(srv.adverts[v]) for v in sorted(reach - mine)))  # noqa: SLF001


def consistency_request(srv: HardenedServer, recipient: int, survivors: Iterable[int]) -> messages.ConsistencyRequest:
    return messages.ConsistencyRequest(srv.inner.params.round_id, recipient, tuple(sorted(survivors)),
                                       hardened.list_hash(srv.entries))
