"""SecAgg+ neighbour graph (Bell et al. 2020): a shuffled ring, each node linked to h on each side.

Why: with the complete graph of Bonawitz every client does n key agreements and mask expansions;
a random k-regular graph with k = O(log n) keeps the masks' privacy (each sum still hides
individual inputs among the survivors) at k expansions per client. The graph must be derived by
every party from the round seed alone, so the shuffle uses an AES-CTR keystream and integer
rejection sampling rather than numpy, whose shuffle algorithms may differ across versions between
a Jetson and the cloud.

Convention (as Flower's ``num_shares``): a node's *neighbourhood* has k = 2h + 1 members,
itself included, with h = ceil(log2 n); its *degree* (other nodes) is 2h. Cohorts of at most
``COMPLETE_UP_TO`` nodes get the complete graph (k = n): at that size the n-squared cost is small,
and a neighbourhood that is the whole cohort tolerates far more colluders (c = 2t - k - 1, with k
the cohort) and leaves nothing to steer. Above it, the ring.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from shared.secagg import prg

# The complete graph up to this many nodes (the README's threat model states the same figure).
# A protocol constant, not a round setting: both sides must draw the same graph, and an
# aggregator that could pick a smaller k would pick the neighbourhoods colluders fill fastest.
COMPLETE_UP_TO = 100


def _cutoff(complete_up_to: int | None) -> int:
    return COMPLETE_UP_TO if complete_up_to is None else complete_up_to


def half_width(n: int) -> int:
    """h = ceil(log2 n): neighbours on each side of the ring."""
    return max(1, math.ceil(math.log2(n))) if n > 1 else 0


def neighbourhood_size(n: int, complete_up_to: int | None = None) -> int:
    """k: the whole cohort up to the cutoff, else 2*ceil(log2 n) + 1 (self included), at most n."""
    if n <= _cutoff(complete_up_to):
        return n
    return min(n, 2 * half_width(n) + 1)


def _permutation(n: int, seed: bytes) -> list[int]:
    """Fisher-Yates driven by the keystream; bitmask rejection keeps every draw unbiased."""
    order = list(range(n))
    budget = 4 * n + 64  # expected need is < 2n draws; regrow (same stream, longer) if ever short
    words = prg.expand(seed, budget)
    pos = 0
    for i in range(n - 1, 0, -1):
        mask = (1 << (i + 1).bit_length()) - 1
        while True:
            if pos == words.size:
                budget *= 2
                words = prg.expand(seed, budget)
            r = int(words[pos]) & mask
            pos += 1
            if r <= i:
                break
        order[i], order[r] = order[r], order[i]
    return order


def _ids(node_ids: Iterable[int]) -> list[int]:
    ids = sorted(node_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("node ids must be unique")
    return ids


def neighbourhoods_of(node_ids: Iterable[int], seed: bytes, nodes: Iterable[int],
                      complete_up_to: int | None = None) -> dict[int, frozenset[int]]:
    """The neighbourhoods of ``nodes`` only (a device needs its own and its neighbours', not n of them)."""
    ids = _ids(node_ids)
    n = len(ids)
    want = list(nodes)
    if n == 0:
        return {}
    if neighbourhood_size(n, complete_up_to) >= n:
        everyone = frozenset(ids)
        return {u: everyone for u in want}
    h = half_width(n)
    ring = [ids[i] for i in _permutation(n, seed)]
    pos = {u: i for i, u in enumerate(ring)}
    return {u: frozenset(ring[(pos[u] + off) % n] for off in range(-h, h + 1)) for u in want}


def build(node_ids: Sequence[int] | Iterable[int], seed: bytes, complete_up_to: int | None = None) -> dict[int, frozenset[int]]:
    """Map each node to its neighbourhood (itself included). Symmetric and deterministic."""
    ids = _ids(node_ids)
    return neighbourhoods_of(ids, seed, ids, complete_up_to)
