"""Upload bytes against final quality: dense fp32 LoRA FedAvg versus our sparse secure path.

Every configuration is a whole ``fl-sim`` run (broker, aggregator, devices as processes) on the
same non-IID synthetic task families, the same student (built once, loaded with
``from_pretrained``), the same seeds and the same rounds; only the update path differs. Bytes are
MQTT PUBLISH bytes the aggregator counted per device, so the secure path's key exchange and the
status messages are included in "upload".

    python benchmarks/compression.py           # full: the demo's settings, 5 configurations
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
    ("secagg dense, 32-bit ring", dict(secagg=True, density=1.0, ring_bits=32)),
    ("secagg top-k 25%, 16-bit ring", dict(secagg=True, density=0.25, ring_bits=16)),
    ("secagg top-k 10%, 16-bit ring", dict(secagg=True, density=0.10, ring_bits=16)),
    ("secagg top-k 5%, 16-bit ring", dict(secagg=True, density=0.05, ring_bits=16)),
    ("secagg top-k 2%, 16-bit ring", dict(secagg=True, density=0.02, ring_bits=16)),
]
QUICK = [FULL[0], FULL[3]]


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__}


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
        axes[1].scatter(x, r["final_mean_exact_match"] or 0.0)
        axes[1].annotate(r["name"], (x, r["final_mean_exact_match"] or 0.0), fontsize=6)
    axes[0].set(xscale="log", xlabel="upload kB per device (whole run)", ylabel="final mean held-out loss",
                title="bytes vs held-out loss")
    axes[1].set(xscale="log", xlabel="upload kB per device (whole run)", ylabel="final mean exact match",
                title="bytes vs exact match")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 configurations, tiny rounds, < 2 minutes")
    ap.add_argument("--work", default=None, help="where runs go (default: a temporary directory)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("fl_sim", "fl_lm", "shared", "aggregator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from fl_sim.models_cli import build_default
    from fl_sim.run import SimSettings, finish, launch

    base = SimSettings()  # the demo's defaults: 3 devices, Dirichlet non-IID, 6 rounds
    common: dict[str, Any] = dict(devices=base.devices, rounds=base.rounds, local_steps=base.local_steps,
                                  examples_per_family=base.examples_per_family, eval_per_family=base.eval_per_family,
                                  seed=0, round_timeout_s=600.0)
    pretrain = base.pretrain_steps
    configs = FULL
    if a.quick:
        common.update(rounds=2, local_steps=4, examples_per_family=20, eval_per_family=4)
        pretrain, configs = 20, QUICK
    work = Path(a.work or tempfile.mkdtemp(prefix="flm-compression-"))
    t0 = time.monotonic()
    student = build_default(work / "models", seed=0, pretrain_steps=pretrain)["student"]
    results = []
    for i, (name, extra) in enumerate(configs):
        t = time.monotonic()
        log.info("[%d/%d] %s ...", i + 1, len(configs), name)
        finish(launch(SimSettings(out=str(work / f"run{i}"), student=student, **common, **extra)))  # type: ignore[arg-type]
        r = summarize(name, {"secagg": extra.get("secagg", True), "density": extra.get("density", 1.0),
                             "ring_bits": extra.get("ring_bits", 32) if extra.get("secagg", True) else None}, work / f"run{i}")
        r["wall_s"] = round(time.monotonic() - t, 1)
        results.append(r)
        log.info("    upload %.0f kB/device, final loss %.4f, exact match %s (%.0fs)", r["upload_bytes_per_device"] / 1e3,
                 r["final_mean_loss"], r["final_mean_exact_match"], r["wall_s"])
    dense = results[0]
    for r in results:
        r["upload_reduction_vs_dense"] = dense["upload_bytes_per_device"] / r["upload_bytes_per_device"]
        r["update_reduction_vs_dense"] = dense["update_bytes_per_device"] / max(1.0, r["update_bytes_per_device"])
        em, em0 = r["final_mean_exact_match"], dense["final_mean_exact_match"]
        r["exact_match_points_vs_dense"] = None if em is None or em0 is None else 100 * (em - em0)
        r["loss_rel_change_vs_dense"] = (r["final_mean_loss"] - dense["final_mean_loss"]) / dense["final_mean_loss"]

    print()
    hdr = f"{'configuration':40s} {'up kB/dev':>10s} {'x fewer':>8s} {'upd x':>7s} {'key kB':>7s} {'loss':>8s} {'dloss%':>7s} {'EM':>6s} {'dEM pt':>7s}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        em = r["final_mean_exact_match"]
        dem = r["exact_match_points_vs_dense"]
        print(f"{r['name']:40s} {r['upload_bytes_per_device'] / 1e3:10.1f} {r['upload_reduction_vs_dense']:8.1f} "
              f"{r['update_reduction_vs_dense']:7.1f} {r['key_exchange_up_bytes_per_device'] / 1e3:7.1f} "
              f"{r['final_mean_loss']:8.4f} {100 * r['loss_rel_change_vs_dense']:+7.2f} "
              f"{'n/a' if em is None else f'{em:.3f}':>6s} {'n/a' if dem is None else f'{dem:+.1f}':>7s}")
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "compression.quick" if a.quick else "compression"
    doc = {"benchmark": "compression", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "quick": a.quick, "settings": {**common, "pretrain_steps": pretrain},
           "wall_s": round(time.monotonic() - t0, 1), "results": results,
           "notes": "upload = all MQTT PUBLISH bytes a device sent during rounds (updates, key exchange, status); "
                    "update = the update messages alone; reductions are dense / this configuration."}
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    plot(results, out_dir / f"{stem}.png")
    print(f"\nwrote {out_dir / (stem + '.json')} and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
