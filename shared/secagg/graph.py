"""SecAgg+ neighbour graph (Bell et al. 2020): a shuffled ring, each node linked to h on each side.

Why: with the complete graph of Bonawitz every client does n key agreements and mask expansions;
a random k-regular graph with k = O(log n) keeps the masks' privacy (each sum still hides
individual inputs among the survivors) at k expansions per client. The graph must be derived by
every party from the round seed alone, so the shuffle uses an AES-CTR keystream and integer
rejection sampling rather than numpy, whose shuffle algorithms may differ across versions between
a Jetson and the cloud.

Convention (as Flower's ``num_shares``): a node's *neighbourhood* has k = 2h + 1 members,
itself included, with h = ceil(log2 n); its *degree* (other nodes) is 2h. When n <= k the graph
is complete.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from shared.secagg import prg


def half_width(n: int) -> int:
    """h = ceil(log2 n): neighbours on each side of the ring."""
    return max(1, math.ceil(math.log2(n))) if n > 1 else 0


def neighbourhood_size(n: int) -> int:
    """k = 2*ceil(log2 n) + 1 (self included), capped at n for the complete graph."""
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


def build(node_ids: Sequence[int], seed: bytes) -> dict[int, frozenset[int]]:
    """Map each node to its neighbourhood (itself included). Symmetric and deterministic."""
    ids = sorted(node_ids)
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError("node ids must be unique")
    if n == 0:
        return {}
    k = neighbourhood_size(n)
    if k >= n:
        everyone = frozenset(ids)
        return {u: everyone for u in ids}
    h = half_width(n)
    ring = [ids[i] for i in _permutation(n, seed)]
    return {ring[i]: frozenset(ring[(i + off) % n] for off in range(-h, h + 1)) for i in range(n)}
