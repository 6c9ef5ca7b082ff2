"""Upload bytes against final quality: dense fp32 LoRA FedAvg versus our sparse secure path.

Every configuration is a whole ``fl-sim`` run (broker, aggregator, devices as processes) on the
same non-IID synthetic task families, the same student (built once, loaded with
``from_pretrained``), the same seeds and the same rounds; only the update path differs. Bytes are
MQTT PUBLISH bytes the aggregator counted per device, so the secure path's key exchange and the
status messages are included in "upload".

    python benchmarks/compression.py           # full: 13 configurations x 2 seeds, 20 rounds (~20 min on 2 cores)
    python benchmarks/compression.py --quick   # smoke run, < 2 minutes

Writes ``benchmarks/results/compression[.quick].json`` and a PNG of the bytes-quality curve.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("compression")

# name, settings that differ from the baseline
FULL = [
    ("dense fp32 FedAvg (FedIT, no secagg)", dict(secagg=False, density=1.0)),
    ("secagg dense, finest values", dict(secagg=True, density=1.0, value_bits=0)),
    ("secagg dense, 6-bit values", dict(secagg=True, density=1.0, value_bits=6)),
    ("secagg dense, 1-bit values", dict(secagg=True, density=1.0, value_bits=1)),
    ("secagg random-k 50%, 4-bit values", dict(secagg=True, density=0.5, value_bits=4, sparse_method="random")),
    ("secagg random-k 33%, 6-bit values", dict(secagg=True, density=0.33, value_bits=6, sparse_method="random")),
    ("secagg random-k 50%, 2-bit values", dict(secagg=True, density=0.5, value_bits=2, sparse_method="random")),
    ("secagg random-k 33%, 4-bit values", dict(secagg=True, density=0.33, value_bits=4, sparse_method="random")),
    ("secagg random-k 25%, 6-bit values", dict(secagg=True, density=0.25, value_bits=6, sparse_method="random")),
    ("secagg random-k 25%, 4-bit values", dict(secagg=True, density=0.25, value_bits=4, sparse_method="random")),
    ("secagg random-k 15%, 6-bit values", dict(secagg=True, density=0.15, value_bits=6, sparse_method="random")),
    ("secagg top-k 25%, 6-bit values", dict(secagg=True, density=0.25, value_bits=6, sparse_method="topk")),
    ("secagg random-k 10%, 14-bit values", dict(secagg=True, density=0.10, value_bits=14, sparse_method="random")),
]
QUICK = [FULL[0], FULL[9]]


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__}


def _mean(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def average(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration over several seeds: numbers averaged, per-seed values kept."""
    out = {k: v for k, v in runs[0].items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
    out.pop("curve", None)
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = _mean([r[k] for r in runs])
    out["per_seed"] = [{k: r[k] for k in ("seed", "final_mean_loss", "final_mean_exact_match", "last5_mean_exact_match",
                                           "upload_bytes_per_device")} for r in runs]
    out["curves"] = {r["seed"]: r["curve"] for r in runs}
    return out


def summarize(name: str, extra: dict[str, Any], out: Path) -> dict[str, Any]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["round"] > 0]
    devices = sorted({d for r in rounds for d in r["bytes_up"]})
    per_dev_up = [sum(r["bytes_up"].get(d, 0) for r in rounds) for d in devices]
    kinds: dict[str, int] = {}
    for r in rounds:
        for per in r.get("bytes_by_kind", {}).values():
            for k, n in per.items():
                kinds[k] = kinds.get(k, 0) + n
    n_dev = max(1, len(devices))
    last = rows[-1]
    return {
        "name": name, **extra,
        "rounds_ok": sum(r["status"] == "ok" for r in rounds), "rounds": len(rounds),
        "upload_bytes_per_device": sum(per_dev_up) / n_dev,
        "update_bytes_per_device": kinds.get("up_update", 0) / n_dev,
        "key_exchange_up_bytes_per_device": kinds.get("up_secagg", 0) / n_dev,
        "status_bytes_per_device": kinds.get("up_status", 0) / n_dev,
        "download_bytes_per_device": sum(sum(r["bytes_down"].values()) for r in rounds) / n_dev,
        "final_mean_exact_match": last["mean_exact_match"], "final_mean_loss": last["mean_loss"],
        # Exact match of this tiny student flips by whole families between rounds; the mean over the
        # last five rounds is the steadier number.
        "last5_mean_exact_match": _mean([r["mean_exact_match"] for r in rounds[-5:]]),
        "last5_mean_loss": _mean([r["mean_loss"] for r in rounds[-5:]]),
        "baseline_mean_loss": rows[0]["mean_loss"], "baseline_mean_exact_match": rows[0]["mean_exact_match"],
        "curve": [{"round": r["round"], "mean_loss": r["mean_loss"], "mean_exact_match": r["mean_exact_match"]} for r in rows],
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        x = r["upload_bytes_per_device"] / 1e3
        axes[0].scatter(x, r["final_mean_loss"])
        axes[0].annotate(r["name"], (x, r["final_mean_loss"]), fontsize=6)
        axes[1].scatter(x, r["last5_mean_exact_match"] or 0.0)
        axes[1].annotate(r["name"], (x, r["last5_mean_exact_match"] or 0.0), fontsize=6)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    tenth = results[0]["upload_bytes_per_device"] / 1e4  # 10x fewer bytes than the dense baseline
    axes[0].set(xscale="log", xlabel="upload kB per device (whole run)", ylabel="final mean held-out loss",
                title="bytes vs held-out loss")
    axes[1].set(xscale="log", xlabel="upload kB per device (whole run)", ylabel="mean exact match, last 5 rounds",
                title="bytes vs exact match")
    for ax in axes:
        ax.axvline(tenth, color="grey", ls="--", lw=0.8)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 configurations, tiny rounds, < 2 minutes")
    ap.add_argument("--work", default=None, help="where runs go (default: a temporary directory)")
    ap.add_argument("--rounds", type=int, default=None, help="override the rounds (default: the demo's)")
    ap.add_argument("--local-steps", type=int, default=None, help="override the local steps (default: the demo's)")
    ap.add_argument("--only", default=None, help="comma-separated configuration numbers (0 = dense baseline, always run)")
    ap.add_argument("--tag", default="", help="suffix for the result files, e.g. r20")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per configuration (data split and training)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("fl_sim", "fl_lm", "shared", "aggregator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from fl_sim.models_cli import build_default
    from fl_sim.run import SimSettings, finish, launch

    base = SimSettings()  # the demo's defaults: 3 devices, Dirichlet non-IID, 6 rounds
    # Many short rounds (20 x 10 local steps, the usual federated regime) rather than the demo's 6 x 40:
    # sparse updates with error feedback trade rounds for bytes, so a 6-round run mostly measures
    # how much of the first round's delta got through.
    # mode fedit: this compares update paths, so nothing else may move the student between rounds.
    common: dict[str, Any] = dict(devices=base.devices, rounds=20, local_steps=10,
                                  examples_per_family=base.examples_per_family, eval_per_family=100,
                                  seed=0, round_timeout_s=600.0, mode="fedit")
    pretrain = base.pretrain_steps
    configs = FULL
    if a.quick:
        common.update(rounds=2, local_steps=4, examples_per_family=20, eval_per_family=4)
        pretrain, configs = 20, QUICK
        a.seeds = 1
    if a.rounds:
        common["rounds"] = a.rounds
    if a.local_steps:
        common["local_steps"] = a.local_steps
    if a.only:
        keep = sorted({0, *(int(x) for x in a.only.split(","))})
        configs = [configs[i] for i in keep]
    work = Path(a.work or tempfile.mkdtemp(prefix="flm-compression-"))
    seeds = list(range(a.seeds))
    t0 = time.monotonic()
    student = build_default(work / "models", seed=0, pretrain_steps=pretrain, teacher_pretrain_steps=0)["student"]
    results = []
    for i, (name, extra) in enumerate(configs):
        runs = []
        for seed in seeds:
            t = time.monotonic()
            log.info("[%d/%d] %s, seed %d ...", i + 1, len(configs), name, seed)
            out = work / f"run{i}-s{seed}"
            finish(launch(SimSettings(out=str(out), student=student, **{**common, "seed": seed}, **extra)))  # type: ignore[arg-type]
            r = summarize(name, {"secagg": extra.get("secagg", True), "density": extra.get("density", 1.0),
                                 "sparse_method": extra.get("sparse_method", "topk"),
                                 "value_bits": extra.get("value_bits", 0) if extra.get("secagg", True) else None}, out)
            r["seed"], r["wall_s"] = seed, round(time.monotonic() - t, 1)
            runs.append(r)
            log.info("    upload %.0f kB/device, final loss %.4f, exact match %s (last 5 rounds %.3f) (%.0fs)",
                     r["upload_bytes_per_device"] / 1e3, r["final_mean_loss"], r["final_mean_exact_match"],
                     r["last5_mean_exact_match"] or 0.0, r["wall_s"])
        results.append(average(runs))
    dense = results[0]
    for r in results:
        r["upload_reduction_vs_dense"] = dense["upload_bytes_per_device"] / r["upload_bytes_per_device"]
        r["update_reduction_vs_dense"] = dense["update_bytes_per_device"] / max(1.0, r["update_bytes_per_device"])
        em, em0 = r["last5_mean_exact_match"], dense["last5_mean_exact_match"]
        r["exact_match_points_vs_dense"] = None if em is None or em0 is None else 100 * (em - em0)
        r["loss_rel_change_vs_dense"] = (r["final_mean_loss"] - dense["final_mean_loss"]) / dense["final_mean_loss"]
        dem = r["exact_match_points_vs_dense"]
        ten = r["upload_reduction_vs_dense"] >= 10
        r["meets_target_loss"] = bool(ten and r["loss_rel_change_vs_dense"] <= 0.02)
        r["meets_target_em"] = bool(ten and dem is not None and dem >= -1.0)

    print()
    hdr = (f"{'configuration':38s} {'up kB/dev':>10s} {'x fewer':>8s} {'upd x':>7s} {'key kB':>7s} {'loss':>8s} "
           f"{'dloss%':>7s} {'EM5':>6s} {'dEM pt':>7s} {'target loss/EM':>14s}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        em, dem = r["last5_mean_exact_match"], r["exact_match_points_vs_dense"]
        print(f"{r['name']:38s} {r['upload_bytes_per_device'] / 1e3:10.1f} {r['upload_reduction_vs_dense']:8.1f} "
              f"{r['update_reduction_vs_dense']:7.1f} {r['key_exchange_up_bytes_per_device'] / 1e3:7.1f} "
              f"{r['final_mean_loss']:8.4f} {100 * r['loss_rel_change_vs_dense']:+7.2f} "
              f"{'n/a' if em is None else f'{em:.3f}':>6s} {'n/a' if dem is None else f'{dem:+.1f}':>7s} "
              f"{('yes' if r['meets_target_loss'] else 'no') + ' / ' + ('yes' if r['meets_target_em'] else 'no'):>14s}")
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = ("compression.quick" if a.quick else "compression") + (f".{a.tag}" if a.tag else "")
    doc = {"benchmark": "compression", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "quick": a.quick, "settings": {**common, "pretrain_steps": pretrain},
           "seeds": seeds, "wall_s": round(time.monotonic() - t0, 1), "results": results,
           "notes": "upload = all MQTT PUBLISH bytes a device sent during rounds (updates, key exchange, status); "
                    "update = the update messages alone; reductions are dense / this configuration; numbers are means over "
                    "the seeds; EM5 = mean exact match over the last five rounds; target = at least 10x fewer upload "
                    "bytes and at most 2% higher final loss (loss) / at most 1 point lower EM5 (EM)."}
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    plot(results, out_dir / f"{stem}.png")
    print(f"\nwrote {out_dir / (stem + '.json')} and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
