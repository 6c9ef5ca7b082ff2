"""Secure aggregation benchmark: our SecAgg+ (shared.secagg) against Flower's, same run, same inputs.

Both protocols are driven in-process through their own stage functions; no network. Flower is
emulated exactly as its ``secaggplus_mod`` calls its client stages (``_setup``, ``_share_keys``,
``_collect_masked_vectors``, ``_unmask`` on a ``SecAggPlusState``) and as
``SecAggPlusWorkflow`` runs its server stages (graph, relay, sum, ``combine_shares`` +
``pseudo_rand_gen`` unmasking), minus the Grid/Message transport. Both use the same neighbourhood
size k = 2*ceil(log2 n)+1, the same threshold, the same clip range and the same float inputs.

Measured per configuration:
- client s: mean wall time of one client's four stages (including quantization), over all clients
  (or over a random sample when ``--client-sample`` is set; all clients still run).
- server s: wall time of the server's stage code only (graph, relay, sum, unmask, decode).
- server peak MB: tracemalloc peak of allocations made inside the server calls, plus the server's
  persistent running sum held between calls. The emulation feeds the server one masked vector at
  a time for both; Flower's real workflow additionally holds every reply (n * ~8*d bytes) from
  ``grid.send_and_receive`` before summing, which is not counted here.
- bytes/device: mean over clients of the serialized size of everything a client uploads
  (ours: ``shared.secagg.messages.encode``; Flower: protobuf ``RecordDict`` of each reply).

Usage: python benchmarks/secagg.py [--quick] [--n 10 100 1000] [--d 1000000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import logging
import math
import os
import platform
import random
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.secagg import graph, messages, protocol, quant  # noqa: E402

log = logging.getLogger("benchmarks.secagg")
CLIP = 8.0  # Flower's default clipping range; both sides use it


class ServerMeter:
    """Times server calls and tracks their memory (tracemalloc only while the server runs)."""

    def __init__(self, trace: bool) -> None:
        self.seconds = 0.0
        self.peak = 0
        self.trace = trace

    def __call__(self, fn: Callable[..., Any], *args: Any, persistent: int = 0) -> Any:
        if self.trace:
            tracemalloc.start()
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0
            if self.trace:
                self.peak = max(self.peak, persistent + tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()


def make_input(u: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed * 100_003 + u).normal(0.0, 0.05, d).astype(np.float32)


def pick_dropouts(ids: list[int], frac: float, seed: int) -> set[int]:
    return set(random.Random(seed).sample(ids, round(frac * len(ids))))


# ------------------------------------------------------------------------------------------ ours


def run_ours(n: int, d: int, drop_frac: float, seed: int, sample: set[int] | None, trace: bool = True
             ) -> dict[str, Any]:
    ids = list(range(1, n + 1))
    p = protocol.SecAggParams(round_id=1, node_ids=tuple(ids), threshold=protocol.default_threshold(n), dim=d,
                              graph_seed=os.urandom(32))
    cfg = quant.QuantConfig(clip=CLIP, n_summands=n)
    dropped = pick_dropouts(ids, drop_frac, seed)  # vanish after share keys: no masked input
    ctime = {u: 0.0 for u in ids}
    up = {u: 0 for u in ids}
    srv = ServerMeter(trace)

    def client(u: int, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        ctime[u] += time.perf_counter() - t0
        return out

    server = srv(protocol.server_init, p)
    states, adv = {}, []
    for u in ids:
        states[u], m = client(u, protocol.client_advertise, p, u)
        up[u] += len(messages.encode(m))
        adv.append(m)
    server, nk = srv(protocol.server_collect_keys, server, adv)
    sk = []
    for u in ids:
        states[u], m = client(u, protocol.client_share_keys, states[u], nk[u])
        up[u] += len(messages.encode(m))
        sk.append(m)
    server, fwd = srv(protocol.server_collect_shares, server, sk)
    true_sum = np.zeros(d, dtype=np.float64)
    for u in ids:
        if u in dropped:
            continue
        x = make_input(u, d, seed)
        true_sum += np.clip(x, -CLIP, CLIP)

        def stage2(st: protocol.ClientState, fw: messages.ForwardedShares, x: np.ndarray = x, u: int = u):
            return protocol.client_masked_input(st, fw, quant.quantize(x, cfg, seed=u))

        states[u], y = client(u, stage2, states[u], fwd[u])
        up[u] += len(messages.encode(y))
        server = srv(protocol.server_add_masked, server, y, persistent=4 * d)
        del y
    server, req = srv(protocol.server_request_unmask, server, persistent=4 * d)
    replies = []
    for u in req.survivors:
        states[u], r = client(u, protocol.client_unmask, states[u], protocol.unmask_request_for(req, u))
        up[u] += len(messages.encode(r))
        replies.append(r)
    res = srv(protocol.server_unmask, server, replies, persistent=4 * d)
    got = srv(quant.dequantize_sum, res.total, cfg, len(res.contributors), persistent=4 * d)
    err = float(np.abs(got - true_sum).max())
    bound = quant.error_bound(cfg, len(res.contributors))
    if err > bound:
        raise AssertionError(f"ours: unmasked sum off by {err} > bound {bound}")
    timed = [u for u in ids if (sample is None or u in sample)]
    live = [u for u in timed if u not in dropped]
    return {"client_s": float(np.mean([ctime[u] for u in live])), "server_s": srv.seconds,
            "server_peak_mb": srv.peak / 2**20, "bytes_per_device": float(np.mean([up[u] for u in ids if u not in dropped])),
            "max_abs_err_sum": err, "error_bound_sum": bound, "threshold": p.threshold,
            "k": graph.neighbourhood_size(n), "clients_timed": len(live)}


# ---------------------------------------------------------------------------------------- flower


def run_flower(n: int, d: int, drop_frac: float, seed: int, sample: set[int] | None) -> dict[str, Any]:
    from flwr.app import ConfigRecord, RecordDict
    # The package re-exports the mod *function* under the module's name; fetch the module itself.
    fm = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (factor_extract, get_parameters_shape,
                                                                    parameters_addition, parameters_mod,
                                                                    parameters_subtraction)
    from flwr.common.secure_aggregation.quantization import dequantize
    from flwr.common.secure_aggregation.secaggplus_constants import Key
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.common.serde import recorddict_to_proto
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    ids = list(range(1, n + 1))
    k = graph.neighbourhood_size(n)
    threshold = protocol.default_threshold(n)
    max_weight = 1000.0
    target_range, mod_range = 1 << 22, 1 << 32
    dropped = pick_dropouts(ids, drop_frac, seed)
    ctime = {u: 0.0 for u in ids}
    up = {u: 0 for u in ids}
    # No tracemalloc here: it slows pycryptodome's pure-Python GF(2^128) Shamir by an order of
    # magnitude, which would inflate Flower's server time. Memory is computed from the workflow.
    srv = ServerMeter(False)
    masked_reply = [0]

    def wire(res: dict[str, Any]) -> int:
        return recorddict_to_proto(RecordDict({"secaggplus": ConfigRecord(res, True)})).ByteSize()

    def client(u: int, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        ctime[u] += time.perf_counter() - t0
        return out

    # Server stage 0 (setup_stage): parameters, shuffled ring graph.
    def setup() -> dict[int, set[int]]:
        order = list(ids)
        random.shuffle(order)
        half = k >> 1
        return {nid: {order[(i + off) % n] for off in range(-half, half + 1)} for i, nid in enumerate(order)}

    nbrs = srv(setup)
    cfg = {Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: k, Key.THRESHOLD: threshold, Key.CLIPPING_RANGE: CLIP,
           Key.TARGET_RANGE: target_range, Key.MOD_RANGE: mod_range, Key.MAX_WEIGHT: max_weight}
    states: dict[int, Any] = {}
    pks: dict[int, list[bytes]] = {}
    for u in ids:
        st = fm.SecAggPlusState()
        st.nid = u
        res = client(u, fm._setup, st, dict(cfg))
        states[u] = st
        up[u] += wire(res)
        pks[u] = [res[Key.PUBLIC_KEY_1], res[Key.PUBLIC_KEY_2]]

    def check(active: set[int]) -> None:
        for nid in ids:
            if len(nbrs[nid] & active) < threshold:
                raise RuntimeError("flower: insufficient available nodes")

    srv(check, set(ids))
    # Stage 1 (share_keys_stage): send neighbour keys, relay ciphertexts.
    replies1 = {}
    for u in ids:
        keys = {str(v): pks[v] for v in nbrs[u]}
        res = client(u, fm._share_keys, states[u], keys)
        up[u] += wire(res)
        replies1[u] = res

    def relay() -> tuple[dict[int, list[bytes]], dict[int, list[int]]]:
        fc: dict[int, list[bytes]] = {v: [] for v in ids}
        fs: dict[int, list[int]] = {v: [] for v in ids}
        for u, res in replies1.items():
            for dst, ct in zip(res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST], strict=True):
                if dst in fc:
                    fc[dst].append(ct)
                    fs[dst].append(u)
        check(set(ids))
        return fc, fs

    fwd_ct, fwd_src = srv(relay)
    # Stage 2 (collect_masked_vectors_stage), one reply at a time.
    acc: list[Any] = [None]
    true_sum = np.zeros(d, dtype=np.float64)

    def add(blobs: list[bytes]) -> None:
        vec = [bytes_to_ndarray(b) for b in blobs]
        acc[0] = vec if acc[0] is None else parameters_addition(acc[0], vec)

    active = set(ids) - dropped
    for u in ids:
        if u in dropped:
            continue
        x = make_input(u, d, seed)
        true_sum += np.clip(x, -CLIP, CLIP)
        params = ndarrays_to_parameters([x])
        conf = {Key.CIPHERTEXT_LIST: fwd_ct[u], Key.SOURCE_LIST: fwd_src[u]}
        res = client(u, fm._collect_masked_vectors, states[u], conf, int(max_weight), params)
        size = wire(res)
        up[u] += size
        masked_reply[0] = max(masked_reply[0], size)
        held = 0 if acc[0] is None else sum(a.nbytes for a in acc[0])
        srv(add, res[Key.MASKED_PARAMETERS], persistent=held)
        del res, params
    held = sum(a.nbytes for a in acc[0])
    acc[0] = srv(parameters_mod, acc[0], mod_range, persistent=held)
    srv(check, active)
    # Stage 3 (unmask_stage).
    replies3 = {}
    for u in sorted(active):
        conf = {Key.ACTIVE_NODE_ID_LIST: list(nbrs[u] & active), Key.DEAD_NODE_ID_LIST: list(nbrs[u] & dropped)}
        res = client(u, fm._unmask, states[u], conf)
        up[u] += wire(res)
        replies3[u] = res

    def unmask() -> np.ndarray:
        collected: dict[int, list[bytes]] = {nid: [] for nid in ids}
        for res in replies3.values():
            for owner, share in zip(res[Key.NODE_ID_LIST], res[Key.SHARE_LIST], strict=True):
                collected[owner].append(share)
        masked = acc[0]
        acc[0] = None
        for nid, share_list in collected.items():
            if len(share_list) < threshold:
                raise RuntimeError("flower: not enough shares")
            secret = combine_shares(share_list)
            if nid in active:
                mask = pseudo_rand_gen(secret, mod_range, get_parameters_shape(masked))
                masked = parameters_subtraction(masked, mask)
            else:
                for v in nbrs[nid] - {nid}:
                    sk = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(pks[v][0]))
                    mask = pseudo_rand_gen(sk, mod_range, get_parameters_shape(masked))
                    masked = parameters_addition(masked, mask) if nid > v else parameters_subtraction(masked, mask)
        recon = parameters_mod(masked, mod_range)
        q_total, recon = factor_extract(recon)
        agg = dequantize(recon, CLIP, target_range)
        offset = -(len(active) - 1) * CLIP
        for vec in agg:
            vec += offset
            vec *= target_range / q_total
        return agg[0]

    mean = srv(unmask, persistent=8 * (d + 1))
    err = float(np.abs(mean * len(active) - true_sum).max())
    timed = [u for u in ids if (sample is None or u in sample)]
    live = [u for u in timed if u not in dropped]
    # Workflow memory: send_and_receive returns every stage-2 reply before the sum starts, then the
    # running sum, one regenerated mask and one result list (int64, d + 1 entries each).
    peak = len(active) * masked_reply[0] + 3 * 8 * (d + 1)
    return {"client_s": float(np.mean([ctime[u] for u in live])), "server_s": srv.seconds,
            "server_peak_mb": peak / 2**20, "server_peak_how": "computed: n held replies + 3 int64 vectors",
            "bytes_per_device": float(np.mean([up[u] for u in ids if u not in dropped])),
            "max_abs_err_sum": err, "threshold": threshold, "k": k, "clients_timed": len(live)}


# ------------------------------------------------------------------------------------------ main


def flower_available() -> str | None:
    try:
        import flwr  # noqa: F401
        importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {exc}"
    return None


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "numpy": np.__version__}
    try:
        import cryptography
        info["cryptography"] = cryptography.__version__
        import flwr
        info["flwr"] = flwr.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def fmt_row(cols: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) for c, w in zip(cols, widths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small n and d, writes secagg.quick.json")
    ap.add_argument("--n", type=int, nargs="+", help="cohort sizes (default 10 100 1000; quick: 10 30)")
    ap.add_argument("--d", type=int, help="vector length (default 1,000,000; quick: 20,000)")
    ap.add_argument("--drop", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--client-sample", type=int, default=0,
                    help="average client time over this many random clients (0: all); all clients still run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-trace", action="store_true", help="do not run tracemalloc around our server calls")
    ap.add_argument("--ours-only", action="store_true", help="skip Flower even if it is importable")
    ap.add_argument("--out", type=Path, help="JSON output path")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("shared.secagg").setLevel(logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    ns = args.n or ([10, 30] if args.quick else [10, 100, 1000])
    d = args.d or (20_000 if args.quick else 1_000_000)
    out = args.out or Path(__file__).parent / "results" / ("secagg.quick.json" if args.quick else "secagg.json")
    why_not = "--ours-only given" if args.ours_only else flower_available()
    if why_not:
        log.warning("Flower (flwr) is not importable (%s): measuring ours only. "
                    "Install the bench extra to compare.", why_not)
    rows = []
    report: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "machine": machine(), "d": d, "clip": CLIP, "flower": why_not is None,
                              "flower_skip_reason": why_not, "dropout_stage": "after share keys (no masked input)",
                              "server_memory": {
                                  "ours": "tracemalloc peak inside our server calls + the persistent running sum "
                                          "(tracemalloc is on during the timed server calls; its overhead counts against us)",
                                  "flower": "computed from its workflow: all n stage-2 replies held (serialized size) "
                                            "+ 3 int64 vectors; not traced (tracing would slow its pure-Python Shamir)"},
                              "results": rows}
    for n in ns:
        for frac in args.drop:
            sample = None
            if args.client_sample and args.client_sample < n:
                sample = set(random.Random(args.seed + n).sample(range(1, n + 1), args.client_sample))
            row: dict[str, Any] = {"n": n, "d": d, "drop": frac}
            t0 = time.perf_counter()
            row["ours"] = run_ours(n, d, frac, args.seed, sample, trace=not args.no_trace)
            log.info("n=%d drop=%.0f%% ours done in %.1f s: %s", n, 100 * frac, time.perf_counter() - t0, row["ours"])
            if why_not is None:
                t0 = time.perf_counter()
                row["flower"] = run_flower(n, d, frac, args.seed, sample)
                log.info("n=%d drop=%.0f%% flower done in %.1f s: %s", n, 100 * frac, time.perf_counter() - t0,
                         row["flower"])
            rows.append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2))  # after every row, so a cut-off run keeps what it did
    heads = ["n", "drop", "client s ours", "flower", "ratio", "server s ours", "flower", "ratio",
             "srv MB ours", "flower", "ratio", "B/dev ours", "flower", "ratio"]
    widths = [5, 5, 13, 8, 6, 13, 8, 6, 11, 8, 6, 11, 10, 6]
    lines = [fmt_row(heads, widths)]
    for r in rows:
        o, f = r["ours"], r.get("flower")
        cols = [str(r["n"]), f"{100 * r['drop']:.0f}%"]
        for key, spec in (("client_s", ".4f"), ("server_s", ".2f"), ("server_peak_mb", ".1f"), ("bytes_per_device", ".0f")):
            cols.append(format(o[key], spec))
            cols += [format(f[key], spec), f"{o[key] / f[key]:.2f}"] if f else ["-", "-"]
        lines.append(fmt_row(cols, widths))
    table = "\n".join(lines)
    report["table"] = table
    out.write_text(json.dumps(report, indent=2))
    print(f"d = {d:,}; machine: {report['machine']}; date {report['date']}")
    if args.client_sample:
        print(f"client time averaged over {args.client_sample} random clients per config (all clients ran)")
    print(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
