"""Turn ``metrics.jsonl`` into ``report.md`` and a PNG plot a person can read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aggregator.record import RoundRecord, read


def _fmt(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _cell(text: str, limit: int = 160) -> str:
    t = " ".join(text.split())  # one table row: newlines and runs of spaces become single spaces
    t = t if len(t) <= limit else t[: limit - 1] + "…"
    return t.replace("|", "\\|") or "(empty)"


def _answers(first: RoundRecord, last: RoundRecord) -> list[str]:
    if not last.samples:
        return []
    before = {s["prompt"]: s["answer"] for s in first.samples}
    out = ["", "## Answers on held-out prompts", "",
           f"The global student's greedy answers before the first round and after round {last.round}, beside the reference.", "",
           "| family | prompt | reference | before | after |", "|---|---|---|---|---|"]
    for s in last.samples:
        out.append(f"| {s['family']} | {_cell(s['prompt'])} | {_cell(s['reference'])} | {_cell(before.get(s['prompt'], ''))} "
                   f"| {_cell(s['answer'])} |")
    return out


def _installed(x: dict[str, Any]) -> str:
    if "installed" not in x:
        return ""
    n = len(x["installed"]) + len(x.get("refused", {})) + len(x.get("no_answer", []))
    refused = "; ".join(f"{d} refused" for d in x.get("refused", {}))
    return f"{len(x['installed'])} of {n} devices" + (f" ({refused})" if refused else "")


def _releases(rows: list[RoundRecord]) -> list[str]:
    rel = [r for r in rows if r.release]
    if not rel:
        return []
    out = ["", "## ONNX releases", "",
           "The global student merged, exported with KV cache and checked against PyTorch before signing (parity gate: "
           "fp32 max logit difference and identical greedy output on held-out prompts; int8 next-token agreement and "
           "loss). Under `releases/` in this directory, each with its signed `release.json`.", "",
           "| round | release | size | quantization | max logit diff | greedy identical | next-token agreement | loss torch / onnx | installed on |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rel:
        x = r.release or {}
        if not x.get("published"):
            out.append(f"| {r.round} | not published: {x.get('reason', '')} | | | | | | | |")
            continue
        p = x["parity"]
        quant = x["quantization"] + (f" ({p['recipe']})" if p.get("recipe") else "")  # the int8 recipe that passed
        out.append(f"| {r.round} | {x['release_id']} | {x['bytes'] / 1e6:.2f} MB | {quant} | "
                   f"{p['max_logit_diff']:.2g} | {p['greedy_identical']}/{p['prompts']} | {p['token_agreement']:.3f} | "
                   f"{p['loss_torch']:.4f} / {p['loss_onnx']:.4f} | {_installed(x)} |")
    return out


def _meaning(first: RoundRecord, last: RoundRecord, b: dict[str, Any]) -> list[str]:
    """The loss beside what a uniform guess and a unigram model score, and how much was scored."""
    import math

    out = ["", "## What the loss means", "",
           "| | held-out loss per response token | perplexity |", "|---|---|---|"]
    for name, v in ((f"uniform guess over the {int(b['vocab']):,}-token vocabulary (ln V)", b["uniform"]),
                    ("unigram fitted on the devices' training responses", b["unigram"]),
                    ("global student before the first round", first.mean_loss),
                    (f"global student after round {last.round}", last.mean_loss)):
        out.append(f"| {name} | {v:.3f} | {math.exp(min(v, 50)):,.1f} |")
    if last.mean_loss >= b["unigram"]:
        verdict = ("**The student does not beat the unigram baseline**: it has learned which tokens are common, not how to "
                   "answer; a falling loss alone does not show learning.")
    elif last.mean_loss >= b["uniform"]:
        verdict = "**The student does not beat a uniform guess.**"
    else:
        gap = b["unigram"] - last.mean_loss
        verdict = f"The student beats the unigram baseline by {gap:.3f} nats per token."
    out += ["", verdict, "",
            f"Scored {b['scored']} held-out examples of the {b['available']} held out (at most {b['cap']} per family; "
            f"to score them all, run with `--eval-per-family {max(b['available'], 1)}`, or set `eval_max_per_family` "
            "in the aggregator's config)."]
    return out


def write_report(out_dir: Path, settings: dict[str, Any], baselines: dict[str, Any] | None = None,
                 data_notes: list[str] | None = None) -> Path:
    rows = read(out_dir / "metrics.jsonl")
    fams = sorted(rows[0].eval) if rows else []
    first, last = rows[0], rows[-1]
    lines = ["# FL-MiniLLM simulation report", ""]
    lines += ["## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in settings.items()]
    fell = last.mean_loss < first.mean_loss
    lines += ["", "## Result", "",
              f"Mode **{last.mode}**. Mean held-out loss of the global student on the devices' families: "
              f"**{first.mean_loss:.4f}** before the first round, **{last.mean_loss:.4f}** after round {last.round} "
              f"({'lower' if fell else 'NOT lower'}, {100 * (last.mean_loss - first.mean_loss) / first.mean_loss:+.1f}%).",
              f"Mean exact match: {_fmt(first.mean_exact_match)} -> {_fmt(last.mean_exact_match)}."]
    if last.student.public is not None and first.student.public is not None:
        lines.append(f"On the public families: loss {first.student.public.mean_loss:.4f} -> {last.student.public.mean_loss:.4f}, "
                     f"exact match {_fmt(first.student.public.mean_exact_match)} -> {_fmt(last.student.public.mean_exact_match)}.")
    if last.teacher is not None and first.teacher is not None:
        t0, t1 = first.teacher, last.teacher
        lines.append(f"Teacher: devices' families loss {t0.private.mean_loss:.4f} -> {t1.private.mean_loss:.4f}, exact match "
                     f"{_fmt(t0.private.mean_exact_match)} -> {_fmt(t1.private.mean_exact_match)}"
                     + (f"; public families loss {t0.public.mean_loss:.4f} -> {t1.public.mean_loss:.4f}"
                        if t0.public and t1.public else "") + ".")
    if baselines:
        lines += _meaning(first, last, baselines)
        lines.append("")
    distil_s = [r.distil["seconds"] for r in rows if r.distil]
    if distil_s:
        lines.append(f"Distillation on the aggregator took {sum(distil_s):.1f} s in all ({sum(distil_s) / len(distil_s):.1f} s a round).")
    lines += _answers(first, last)
    lines += [""]
    if data_notes:
        lines += ["## Where the data is", "", *(f"- {x}" for x in data_notes), ""]
    lines += ["## Rounds", "", "| round | status | updates | mean loss | mean exact match | " + " | ".join(f"{f} loss / EM" for f in fams) + " |",
              "|---|---|---|---|---|" + "---|" * len(fams)]
    for r in rows:
        per = " | ".join(f"{r.eval[f]['loss']:.3f} / {_fmt(r.eval[f]['exact_match'], 2)}" for f in fams)
        lines.append(f"| {r.round} | {r.status} | {len(r.received)}/{len(r.participants)} | {r.mean_loss:.4f} | "
                     f"{_fmt(r.mean_exact_match)} | {per} |")
    left = [(r.round, d, r.drop_reasons.get(d, "")) for r in rows for d in r.dropped]
    abandoned = [(r.round, r.abandon_reason) for r in rows if r.status == "abandoned"]
    if left or abandoned or any(r.rejected_messages for r in rows):
        lines += ["", "## Devices that left a round, and why", "",
                  "Declined (the device said why), offline (its last will), rejected (its update failed a check), "
                  "or no message within the stage's deadline. Rejected messages counts every message refused.", ""]
        lines += ["| round | device | reason |", "|---|---|---|"] + [f"| {rnd} | {d} | {why} |" for rnd, d, why in left]
        lines += [""] + [f"- round {rnd} abandoned: {why}" for rnd, why in abandoned]
        voided = [rnd for rnd, why in abandoned if (why or "").startswith("aggregate rejected")]
        if voided:
            # The residual risk of secure aggregation (README, threat model): a device can send
            # out-of-range values under its masks; the sum's bounds check catches it and voids the round.
            lines.append(f"- rounds voided because the unmasked sum was out of bounds (a device sent out-of-range values "
                         f"under its masks): {len(voided)} ({', '.join(map(str, voided))})")
        if any(r.rejected_messages for r in rows):
            lines.append("- rejected messages: " + ", ".join(f"round {r.round}: {r.rejected_messages}"
                                                           for r in rows if r.rejected_messages))
    if any(r.teacher or r.student.public for r in rows):
        lines += ["", "## Student and teacher per round", "",
                  "Mean held-out loss / exact match; *private* are the devices' families, *public* the aggregator's.", "",
                  "| round | student private | student public | teacher private | teacher public | distil s |", "|---|---|---|---|---|---|"]
        for r in rows:
            def cell(e: Any) -> str:
                return "" if e is None else f"{e.mean_loss:.3f} / {_fmt(e.mean_exact_match, 2)}"
            lines.append(f"| {r.round} | {cell(r.student.private)} | {cell(r.student.public)} | "
                         f"{cell(r.teacher.private if r.teacher else None)} | {cell(r.teacher.public if r.teacher else None)} | "
                         f"{_fmt(r.distil['seconds'], 1) if r.distil else ''} |")
    lines += _releases(rows)
    devices = sorted({d for r in rows for d in list(r.bytes_up) + list(r.bytes_down)})
    lines += ["", "## Bytes on the wire per device", "",
              "MQTT PUBLISH packets as sent or received (fixed header, topic, packet id, payload); TCP/TLS framing and acks "
              "not counted. Up: updates, secure-aggregation key exchange and status messages the device sent during rounds; "
              "down: round announcements (each carries the global adapter) and secure-aggregation relays.", "",
              "| device | " + " | ".join(f"r{r.round} up / down" for r in rows if r.round > 0) + " | total up | total down |",
              "|---|" + "---|" * (sum(1 for r in rows if r.round > 0) + 2)]
    for d in devices:
        cells = [f"{r.bytes_up.get(d, 0):,} / {r.bytes_down.get(d, 0):,}" for r in rows if r.round > 0]
        up = sum(r.bytes_up.get(d, 0) for r in rows)
        dn = sum(r.bytes_down.get(d, 0) for r in rows)
        lines.append(f"| {d} | " + " | ".join(cells) + f" | {up:,} | {dn:,} |")
    kinds: dict[str, int] = {}
    for r in rows:
        for per_kind in r.bytes_by_kind.values():
            for k, n in per_kind.items():
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


def plot(rows: list[RoundRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in rows]
    fams = sorted(rows[0].eval)
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    # The mean first and thin, so no family's line hides under it.
    axes[0].plot(rounds, [r.mean_loss for r in rows], color="0.6", lw=4, alpha=0.5, label="mean", zorder=1)
    for f in fams:
        axes[0].plot(rounds, [r.eval[f]["loss"] for r in rows], marker="o", ms=3, lw=1.2, label=f, zorder=2)
    axes[0].set(title="student held-out loss, devices' families", xlabel="round", ylabel="loss per response token")
    axes[0].legend(fontsize=7)

    def curve(ax: Any, get: Any, label: str, style: str) -> None:
        ys = [get(r) for r in rows]
        if any(y is not None for y in ys):
            ax.plot(rounds, [float("nan") if y is None else y for y in ys], style, label=label)

    for ax, attr, title in ((axes[1], "mean_loss", "mean held-out loss"), (axes[2], "mean_exact_match", "mean held-out exact match")):
        curve(ax, lambda r, a=attr: getattr(r.student.private, a), "student, private", "k-o")
        curve(ax, lambda r, a=attr: getattr(r.student.public, a) if r.student.public else None, "student, public", "k--s")
        curve(ax, lambda r, a=attr: getattr(r.teacher.private, a) if r.teacher else None, "teacher, private", "r-o")
        curve(ax, lambda r, a=attr: getattr(r.teacher.public, a) if r.teacher and r.teacher.public else None, "teacher, public", "r--s")
        ax.set(title=f"{title}: student and teacher", xlabel="round")
        ax.legend(fontsize=7)
    axes[2].set_ylim(0, 1)
    devices = sorted({d for r in rows for d in list(r.bytes_up) + list(r.bytes_down)})
    for i, d in enumerate(devices):
        c = f"C{i % 10}"
        axes[3].plot(rounds[1:], [r.bytes_up.get(d, 0) / 1e3 for r in rows[1:]], "-o", color=c, ms=3, label=f"{d} up")
        axes[3].plot(rounds[1:], [r.bytes_down.get(d, 0) / 1e3 for r in rows[1:]], "--s", color=c, ms=3, label=f"{d} down")
    axes[3].set(title="bytes per device per round (up: sent, down: received)", xlabel="round", ylabel="kB")
    axes[3].set_ylim(bottom=0)
    if devices:
        axes[3].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
