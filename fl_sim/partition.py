"""Non-IID splits of examples across devices: by family, or Dirichlet(alpha) per family."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from shared.datasets import Example


def split_by_family(examples: list[Example], n_devices: int) -> list[list[Example]]:
    """Families dealt round-robin: device i gets families i, i+n, ... (the most skewed split)."""
    fams = sorted({e.family for e in examples})
    shards: list[list[Example]] = [[] for _ in range(n_devices)]
    for i, fam in enumerate(fams):
        shards[i % n_devices].extend(e for e in examples if e.family == fam)
    return shards


def split_dirichlet(examples: list[Example], n_devices: int, alpha: float, seed: int, min_per_device: int = 8) -> list[list[Example]]:
    """For each family, device shares ~ Dirichlet(alpha): small alpha, skewed; large, near IID.

    Redraws (up to 100 times) until every device has at least ``min_per_device`` examples, so no
    simulated device starts with nothing to train on.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    by_fam: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_fam[e.family].append(e)
    rng = np.random.default_rng(seed)
    for _ in range(100):
        shards: list[list[Example]] = [[] for _ in range(n_devices)]
        for fam in sorted(by_fam):
            items = by_fam[fam]
            props = rng.dirichlet([alpha] * n_devices)
            cuts = (np.cumsum(props)[:-1] * len(items)).astype(int)
            for dev, part in enumerate(np.split(np.arange(len(items)), cuts)):
                shards[dev].extend(items[j] for j in part)
        if min(len(s) for s in shards) >= min_per_device:
            return shards
    raise ValueError(f"could not give every one of {n_devices} devices {min_per_device} examples from {len(examples)}")


def split_even(examples: list[Example], n_devices: int, seed: int) -> list[list[Example]]:
    """Shuffle and deal: for one user file split across devices."""
    idx = np.random.default_rng(seed).permutation(len(examples))
    return [[examples[j] for j in idx[i::n_devices]] for i in range(n_devices)]
