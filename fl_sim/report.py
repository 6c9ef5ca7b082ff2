"""Turn ``metrics.jsonl`` into ``report.md`` and a PNG plot a person can read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def write_report(out_dir: Path, settings: dict[str, Any]) -> Path:
    rows = read_metrics(out_dir / "metrics.jsonl")
    fams = sorted(rows[0]["eval"]) if rows else []
    first, last = rows[0], rows[-1]
    lines = ["# FL-MiniLLM simulation report", ""]
    lines += ["## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in settings.items()]
    fell = last["mean_loss"] < first["mean_loss"]
    lines += ["", "## Result", "",
              f"Mean held-out loss of the global student: **{first['mean_loss']:.4f}** before the first round, "
              f"**{last['mean_loss']:.4f}** after round {last['round']} "
              f"({'lower' if fell else 'NOT lower'}, {100 * (last['mean_loss'] - first['mean_loss']) / first['mean_loss']:+.1f}%).",
              f"Mean exact match: {_fmt(first['mean_exact_match'])} -> {_fmt(last['mean_exact_match'])}.", ""]
    lines += ["## Rounds", "", "| round | status | updates | mean loss | mean exact match | " + " | ".join(f"{f} loss / EM" for f in fams) + " |",
              "|---|---|---|---|---|" + "---|" * len(fams)]
    for r in rows:
        per = " | ".join(f"{r['eval'][f]['loss']:.3f} / {_fmt(r['eval'][f]['exact_match'], 2)}" for f in fams)
        lines.append(f"| {r['round']} | {r['status']} | {len(r['received'])}/{len(r['participants'])} | {r['mean_loss']:.4f} | "
                     f"{_fmt(r['mean_exact_match'])} | {per} |")
    devices = sorted({d for r in rows for d in list(r["bytes_up"]) + list(r["bytes_down"])})
    lines += ["", "## Bytes on the wire per device", "",
              "MQTT PUBLISH packets as sent or received (fixed header, topic, packet id, payload); TCP/TLS framing and acks "
              "not counted. Up: updates, secure-aggregation key exchange and status messages the device sent during rounds; "
              "down: round announcements (each carries the global adapter) and secure-aggregation relays.", "",
              "| device | " + " | ".join(f"r{r['round']} up / down" for r in rows if r["round"] > 0) + " | total up | total down |",
              "|---|" + "---|" * (sum(1 for r in rows if r["round"] > 0) + 2)]
    for d in devices:
        cells = [f"{r['bytes_up'].get(d, 0):,} / {r['bytes_down'].get(d, 0):,}" for r in rows if r["round"] > 0]
        up = sum(r["bytes_up"].get(d, 0) for r in rows)
        dn = sum(r["bytes_down"].get(d, 0) for r in rows)
        lines.append(f"| {d} | " + " | ".join(cells) + f" | {up:,} | {dn:,} |")
    kinds: dict[str, int] = {}
    for r in rows:
        for per in r.get("bytes_by_kind", {}).values():
            for k, n in per.items():
                kinds[k] = kinds.get(k, 0) + n
    if kinds:
        lines += ["", "Totals over all devices and rounds by message kind (`up_secagg` and `down_secagg` are the "
                  "secure-aggregation key exchange and unmasking; `up_update` the updates themselves):", "",
                  "| kind | bytes |", "|---|---|"] + [f"| {k} | {n:,} |" for k, n in sorted(kinds.items())]
    lines += ["", "![metrics](metrics.png)", ""]
    plot(rows, out_dir / "metrics.png")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fams = sorted(rows[0]["eval"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for f in fams:
        axes[0].plot(rounds, [r["eval"][f]["loss"] for r in rows], marker=".", alpha=0.6, label=f)
    axes[0].plot(rounds, [r["mean_loss"] for r in rows], "k-o", lw=2, label="mean")
    axes[0].set(title="held-out loss (global student)", xlabel="round", ylabel="loss per response token")
    axes[0].legend(fontsize=7)
    em = [r["mean_exact_match"] for r in rows]
    if any(x is not None for x in em):
        axes[1].plot(rounds, [x if x is not None else float("nan") for x in em], "k-o")
    axes[1].set(title="mean held-out exact match", xlabel="round", ylim=(0, 1))
    devices = sorted({d for r in rows for d in r["bytes_up"]})
    for d in devices:
        axes[2].plot(rounds[1:], [r["bytes_up"].get(d, 0) / 1e3 for r in rows[1:]], marker="o", label=f"{d} up")
    axes[2].set(title="bytes sent per device per round", xlabel="round", ylabel="kB")
    axes[2].set_ylim(bottom=0)
    if devices:
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
