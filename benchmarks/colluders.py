"""How often a colluding coalition fills some honest device's SecAgg+ neighbourhood (README, threat model).

On the SecAgg+ ring a neighbourhood has k = 2 ceil(log2 n) + 1 members and a device's secrets
survive c = 2t - k - 1 colluders in it; 2t - k colluders around one honest device rebuild its
secrets (``tests/test_secure_attacks.py`` shows it as the control). The ring is drawn from the
round's seed, which no party steers (``shared.secagg.hardened``), so whether a coalition of a
given size lands 2t - k of its members around some honest device is chance. This measures that
chance by Monte Carlo over rings drawn by the protocol's own code (``shared.secagg.graph.build``
with fresh random seeds) and a fresh random coalition each trial, beside the union bound
n x P(one neighbourhood holds 2t - k), a hypergeometric tail, as the figure to compare with.

    python benchmarks/colluders.py           # 10,000 rings per configuration (~3 minutes)
    python benchmarks/colluders.py --quick   # 300 rings per configuration, < 30 s

Writes ``benchmarks/results/colluders[.quick].json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.secagg import graph, protocol  # noqa: E402

log = logging.getLogger("colluders")

CONFIGS = [(101, 0.05), (101, 0.10), (1000, 0.05), (1000, 0.10)]  # (cohort, colluding fraction)


def hypergeom_tail(n: int, c: int, k: int, m: int) -> float:
    """P(at least ``m`` colluders among the k-1 others of one honest device's neighbourhood), c of the n-1 others colluding."""
    others = k - 1
    total = math.comb(n - 1, others)
    return sum(math.comb(c, j) * math.comb(n - 1 - c, others - j) for j in range(m, min(c, others) + 1)) / total


def wilson(hits: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    if trials == 0:
        return 0.0, 1.0
    p = hits / trials
    d = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / d
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def trial(ids: list[int], c: int, need: int, rng: random.Random) -> bool:
    """One round: a fresh graph seed and a fresh coalition; does some honest device have ``need`` colluders around it?"""
    nbrs = graph.build(ids, rng.randbytes(32))
    bad = set(rng.sample(ids, c))
    return any(len(nbrs[u] & bad) >= need for u in ids if u not in bad)


def run(n: int, frac: float, trials: int, seed: int) -> dict[str, Any]:
    ids = list(range(1, n + 1))
    k = graph.neighbourhood_size(n)
    t = protocol.default_threshold(n)
    need = 2 * t - k  # colluders around one honest device that rebuild its secrets
    c = round(frac * n)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    hits = sum(trial(ids, c, need, rng) for _ in range(trials))
    lo, hi = wilson(hits, trials)
    one = hypergeom_tail(n, c, k, need)
    return {"n": n, "k": k, "t": t, "tolerated": need - 1, "colluders": c, "fraction": frac, "trials": trials, "hits": hits,
            "p_some_device": hits / trials, "ci95": [lo, hi], "p_one_device": one, "union_bound": min(1.0, (n - c) * one),
            "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 rings per configuration")
    ap.add_argument("--trials", type=int, default=None, help="rings per configuration (default 10000, quick 300)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    trials = a.trials or (300 if a.quick else 10000)
    rows = []
    for i, (n, frac) in enumerate(CONFIGS, 1):
        log.info("[%d/%d] n = %d, %.0f %% colluding, %d rings ...", i, len(CONFIGS), n, 100 * frac, trials)
        rows.append(run(n, frac, trials, a.seed + i))
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
           "what": "P(some honest device has 2t - k colluders in its neighbourhood) over random SecAgg+ rings "
                   "(shared.secagg.graph.build, fresh seed and coalition per trial), with the union bound beside it",
           "results": rows}
    out = ROOT / "benchmarks" / "results" / ("colluders.quick.json" if a.quick else "colluders.json")
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n{'n':>5} {'k':>3} {'t':>3} {'tolerated':>9} {'colluders':>9} {'P(some device)':>15} {'95% CI':>15} "
          f"{'union bound':>11} {'MC / bound':>10}")
    for r in rows:
        ratio = r["p_some_device"] / r["union_bound"] if r["union_bound"] > 0 else float("nan")
        print(f"{r['n']:>5} {r['k']:>3} {r['t']:>3} {r['tolerated']:>9} {r['colluders']:>9} {r['p_some_device']:>15.4f} "
              f"{r['ci95'][0]:>7.4f}-{r['ci95'][1]:<7.4f} {r['union_bound']:>11.4f} {ratio:>10.2f}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
