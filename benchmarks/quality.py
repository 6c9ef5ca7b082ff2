"""Quality of the student (and the teacher) by method: local-only, FedIT, fedkd, centralized.

Same data split, same seeds, same rounds and local steps for every method; only what the
aggregator does differs. FedIT and fedkd are whole ``fl-sim`` runs (broker, aggregator and
devices as processes, secure aggregation on); local-only and centralized train the same LoRA
student in this process with the same local training code (``fl_lm.train``):

- local-only: each device trains alone on its own shard for rounds x local steps; the numbers
  are the mean over devices;
- centralized: one student on everything pooled (all shards and the public set, each family
  drawn equally often) for rounds x local steps x devices steps, i.e. the same number of
  examples the fleet processes.

Every final model is scored here, by one evaluator, from its PEFT checkpoint:
- synthetic (the generated families, Dirichlet non-IID over devices): held-out exact match and
  loss per family, on the devices' (private) families and on the aggregator's public families;
- alpaca (../shared/data/alpaca-4k.jsonl, split non-IID by instruction kind): held-out perplexity
  and ROUGE-L (rouge-score) of greedy answers, beside the uniform (ln V) and unigram baselines;
  a part no device holds is the aggregator's public set;
- fedkd-xtok: fedkd with a teacher that has its own tokenizer (MinED + DTW alignment).
- fl-minillm (``--methods ...,fl-minillm``; not in the default set until it has been measured):
  sequence-level distillation with alternating roles, the fleet's scores under secure aggregation.

    python benchmarks/quality.py            # full: 2 seeds, both data sets
    python benchmarks/quality.py --quick    # smoke run (< 2 minutes): synthetic, 1 seed, 2 rounds

Writes ``benchmarks/results/quality[.quick].json`` and a PNG of the curves.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from quality_common import ALPACA, ROOT, Data, balanced, load_checkpoint, machine, mean_of, rouge_l, text_baselines, token_loss, write_layout
from quality_common import alpaca_data as _alpaca_data
from quality_common import run_sim as sim_run
from quality_common import train_in_process as train_common
from shared.datasets import Example

log = logging.getLogger("quality")


@dataclass(frozen=True)
class Setup:
    """What every method of one data set shares."""

    name: str
    devices: int = 3
    rounds: int = 20
    local_steps: int = 40
    learning_rate: float = 1e-3
    lora_r: int = 16
    batch_size: int = 8  # the cpu-dev profile's
    max_len: int = 128
    student_pretrain: int = 800
    teacher_pretrain: int = 2000
    distil_steps: int = 20
    distil_lr: float = 5e-4
    teacher_lr: float = 2.5e-4
    eval_per_family: int = 50
    text: bool = False  # real text: perplexity and ROUGE-L instead of exact match
    gen_tokens: int = 64


SYNTHETIC = Setup("synthetic")
TEXT = Setup("alpaca", student_pretrain=300, teacher_pretrain=600, text=True, eval_per_family=400)


# -- data -------------------------------------------------------------------------------------
def synthetic_data(st: Setup, seed: int) -> Data:
    from fl_sim import prepare

    d = prepare.generated(st.devices, 200, st.eval_per_family, "dirichlet", 0.5, seed)
    return Data(d.shards, d.public, d.heldout, d.public_heldout)


def alpaca_data(st: Setup, seed: int, limit: int | None = None) -> Data:
    return _alpaca_data(st.devices, seed, limit=limit)


# -- scoring ----------------------------------------------------------------------------------
def score(model: Any, tok: Any, sets: dict[str, list[Example]], st: Setup) -> dict[str, Any]:
    """Per family: loss (per response token) and exact match, or perplexity and ROUGE-L; plus means."""
    from fl_lm.evaluate import evaluate

    exs = [e for f in sorted(sets) for e in sets[f]]
    if not exs:
        return {}
    fams = evaluate(model, tok, exs, st.max_len, 64)
    out: dict[str, Any] = {"families": {f: {"n": s.n, "loss": s.loss, "exact_match": s.exact_match} for f, s in fams.items()}}
    out["loss"] = sum(s.loss for s in fams.values()) / len(fams)
    ems = [s.exact_match for s in fams.values() if s.exact_match is not None]
    out["exact_match"] = sum(ems) / len(ems) if ems else None
    if st.text:
        tot_loss, tot_tok = token_loss(model, tok, exs, st.max_len)
        out["perplexity"] = math.exp(tot_loss / tot_tok)
        out["rouge_l"] = rouge_l(model, tok, exs, st.max_len, st.gen_tokens)
        # Pure sampling (top-k 0, top-p 1, T 1), as MiniLLM scores long generations, beside greedy.
        out["rouge_l_sampled"] = rouge_l(model, tok, exs, st.max_len, st.gen_tokens, sample=True)
    return out


# -- methods ----------------------------------------------------------------------------------
def train_in_process(student: str, examples: list[Example], steps: int, st: Setup, seed: int) -> tuple[Any, Any]:
    peft, tok, _ = train_common(student, examples, steps, lr=st.learning_rate, lora_r=st.lora_r, batch_size=st.batch_size,
                                max_len=st.max_len, seed=seed)
    return peft, tok


def eval_all(model: Any, tok: Any, d: Data, st: Setup) -> dict[str, Any]:
    return {"private": score(model, tok, d.heldout, st), "public": score(model, tok, d.public_heldout, st) if d.public_heldout else None}


def run_sim(work: Path, name: str, layout: dict[str, Path], student: str, teacher: str | None, mode: str, st: Setup,
            seed: int, quick: bool) -> dict[str, Any]:
    from fl_sim.run import SimSettings

    s = SimSettings(devices=st.devices, rounds=st.rounds, out=str(work / name), data=str(layout["devices"]),
                    public_data=str(layout["public"]), eval_data=str(layout["eval"]),
                    public_eval_data=str(layout["public_eval"]) if "public_eval" in layout else None,
                    student=student, teacher=teacher, mode=mode, local_steps=st.local_steps,
                    learning_rate=st.learning_rate, lora_r=st.lora_r, distil_steps=st.distil_steps, distil_lr=st.distil_lr,
                    teacher_lr=st.teacher_lr, seed=seed,
                    eval_per_family=4 if quick else min(st.eval_per_family, 30), round_timeout_s=900.0)
    return sim_run(s)


def one_seed(st: Setup, seed: int, work: Path, methods: list[str], quick: bool) -> dict[str, Any]:
    from fl_sim.models_cli import build_default

    d = synthetic_data(st, seed) if not st.text else alpaca_data(st, seed, limit=400 if quick else None)
    layout = write_layout(work, d)
    log.info("[%s seed %d] %s private examples on %d devices, %d public, %d held-out", st.name, seed,
             [len(s) for s in d.shards], st.devices, len(d.public), sum(len(v) for v in d.heldout.values()))
    t = time.monotonic()
    models = build_default(work / "models", seed, st.student_pretrain, public=d.public, teacher_pretrain_steps=st.teacher_pretrain,
                           generic=not st.text)
    log.info("[%s seed %d] offline models built from the public set in %.0fs", st.name, seed, time.monotonic() - t)
    res: dict[str, Any] = {"seed": seed, "sizes": {"shards": [len(s) for s in d.shards], "public": len(d.public),
                                                   "heldout": {k: len(v) for k, v in d.heldout.items()},
                                                   "public_heldout": {k: len(v) for k, v in d.public_heldout.items()}}}
    from fl_lm.loading import load_model, load_tokenizer, param_count

    tok = load_tokenizer(models["student"])
    base = load_model(models["student"])
    res["params"] = {"student": param_count(base), "teacher": param_count(load_model(models["teacher"]))}
    res["student_base"] = eval_all(base, tok, d, st)
    if st.text:
        held = [e for v in d.heldout.values() for e in v]
        res["baselines"] = text_baselines(tok, [e for s in d.shards for e in s] + d.public, held)
    budget = st.rounds * st.local_steps
    for m in methods:
        t = time.monotonic()
        log.info("[%s seed %d] %s ...", st.name, seed, m)
        if m == "local":
            per = []
            for i, shard in enumerate(d.shards):
                model, tk = train_in_process(models["student"], shard, budget, st, seed * 100 + i)
                per.append(eval_all(model, tk, d, st))
            res[m] = {**mean_of(per), "per_device": per}
        elif m == "centralized":
            model, tk = train_in_process(models["student"], balanced([e for s in d.shards for e in s] + d.public),
                                         budget * st.devices, st, seed)
            res[m] = eval_all(model, tk, d, st)
        elif m in ("fedit", "fedkd", "fedkd_xtok", "fl-minillm"):
            student, teacher = models["student"], models["teacher"]
            if m == "fedkd_xtok":
                xt = build_default(work / "models_xtok", seed, st.student_pretrain, public=d.public,
                                   teacher_pretrain_steps=st.teacher_pretrain, teacher_tokenizer="metaspace", generic=not st.text)
                teacher = xt["teacher"]  # its own tokenizer; the student stays the one every method uses
            mode = m if m in ("fedit", "fl-minillm") else "fedkd"
            sim = run_sim(work, m, layout, student, teacher if m != "fedit" else None, mode, st, seed, quick)
            model, tk = load_checkpoint(student, Path(sim["state"]["checkpoint"]))
            r = eval_all(model, tk, d, st)
            if m != "fedit":
                tb, tt = load_checkpoint(teacher, sim["out"] / "checkpoints" / "teacher" / "round_0000")
                ta, _ = load_checkpoint(teacher, Path(sim["state"]["teacher_checkpoint"]))
                r["teacher_before"] = eval_all(tb, tt, d, st)
                r["teacher_after"] = eval_all(ta, tt, d, st)
            r.update({k: v for k, v in sim.items() if k not in ("out", "state")})
            res[m] = r
        else:
            raise ValueError(f"unknown method {m!r}")
        res[m]["method_s"] = round(time.monotonic() - t, 1)
        log.info("[%s seed %d] %s: %s (%.0fs)", st.name, seed, m, headline(res[m], st), time.monotonic() - t)
    return res


def headline(r: dict[str, Any], st: Setup) -> str:
    p, q = r.get("private") or {}, r.get("public") or {}
    if st.text:
        return f"held-out ppl {p.get('perplexity', float('nan')):.1f}, ROUGE-L {p.get('rouge_l', float('nan')):.3f}"
    return (f"private EM {p.get('exact_match') or 0:.3f} loss {p.get('loss', float('nan')):.3f}; "
            f"public EM {q.get('exact_match') or 0:.3f} loss {q.get('loss', float('nan')):.3f}")


# -- summary ----------------------------------------------------------------------------------
def student_metric(r: dict[str, Any], st: Setup) -> float:
    """The target's 'mean held-out metric over private and public data' (higher is better)."""
    if st.text:
        return float(r["private"]["rouge_l"])
    parts = [r["private"]["exact_match"]] + ([r["public"]["exact_match"]] if r.get("public") else [])
    return sum(parts) / len(parts)


def judge(st: Setup, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each target of the issue, per seed, as measured."""
    out: dict[str, Any] = {}
    for s in seeds:
        if "fedkd" not in s or "fedit" not in s:
            continue
        kd, it = s["fedkd"], s["fedit"]
        j: dict[str, Any] = {}
        j["fedkd_beats_fedit_mean"] = student_metric(kd, st) > student_metric(it, st)
        if st.text:
            j["private_gap_loss_rel"] = (kd["private"]["loss"] - it["private"]["loss"]) / it["private"]["loss"]
            j["private_within_tolerance"] = j["private_gap_loss_rel"] <= 0.02
        else:
            j["private_gap_em_points"] = 100 * (kd["private"]["exact_match"] - it["private"]["exact_match"])
            j["private_gap_loss_rel"] = (kd["private"]["loss"] - it["private"]["loss"]) / it["private"]["loss"]
            j["private_within_tolerance"] = j["private_gap_em_points"] >= -1.0 or j["private_gap_loss_rel"] <= 0.02
        if "centralized" in s:
            c = student_metric(s["centralized"], st)
            j["fedkd_share_of_centralized"] = student_metric(kd, st) / c if c else None
            j["reaches_90pct_of_centralized"] = bool(c and student_metric(kd, st) >= 0.9 * c)
        tb, ta = kd["teacher_before"], kd["teacher_after"]
        key = "rouge_l" if st.text else "exact_match"
        j["teacher_private_before_after"] = (tb["private"][key], ta["private"][key])
        j["teacher_private_better"] = ta["private"][key] > tb["private"][key]
        if tb.get("public"):
            j["teacher_public_before_after"] = (tb["public"][key], ta["public"][key])
            j["teacher_public_no_worse"] = ta["public"][key] >= tb["public"][key]
        if not st.text and "centralized" in s:
            j["centralized_mean_em"] = s["centralized"]["private"]["exact_match"]
            j["centralized_at_least_0.5"] = s["centralized"]["private"]["exact_match"] >= 0.5
        if "fl-minillm" in s:
            # Issue 10: does sequence-level distillation beat token-level fedkd here (greedy and sampled)?
            mm = s["fl-minillm"]
            j["flminillm_vs_fedkd_mean"] = (student_metric(mm, st), student_metric(kd, st))
            j["flminillm_beats_fedkd_mean"] = student_metric(mm, st) > student_metric(kd, st)
            if st.text:
                j["flminillm_vs_fedkd_sampled_rouge_l"] = (mm["private"]["rouge_l_sampled"], kd["private"]["rouge_l_sampled"])
                j["flminillm_beats_fedkd_sampled"] = mm["private"]["rouge_l_sampled"] > kd["private"]["rouge_l_sampled"]
        if st.text and "centralized" in s:
            j["centralized_ppl_vs_unigram"] = (s["centralized"]["private"]["perplexity"], s["baselines"]["unigram"]["perplexity"])
        out[f"seed{s['seed']}"] = j
    return out


def table(st: Setup, seeds: list[dict[str, Any]], methods: list[str]) -> list[str]:
    rows = ["student base", *methods]
    lines = []
    if st.text:
        lines.append(f"{'method':16s} " + " ".join(f"{'s' + str(s['seed']) + ' ppl':>10s} {'RL-greedy':>9s} {'RL-sampled':>10s}"
                                                    for s in seeds))
        for m in rows:
            key = "student_base" if m == "student base" else m
            cells = []
            for s in seeds:
                r = s.get(key)
                cells.append(f"{r['private']['perplexity']:10.1f} {r['private']['rouge_l']:9.3f} "
                             f"{r['private'].get('rouge_l_sampled', float('nan')):10.3f}" if r else f"{'-':>10s} {'-':>9s} {'-':>10s}")
            lines.append(f"{m:16s} " + " ".join(cells))
        b = seeds[0]["baselines"]
        lines.append(f"{'uniform (ln V)':16s} {b['uniform']['perplexity']:10.1f}")
        lines.append(f"{'unigram':16s} {b['unigram']['perplexity']:10.1f}   (echo-input ROUGE-L {b['echo_input_rouge_l']:.3f})")
        return lines + bytes_lines(seeds, methods)
    lines.append(f"{'method':16s} " + " ".join(f"{'s' + str(s['seed']) + ' privEM':>10s} {'pubEM':>6s} {'privL':>6s} {'pubL':>6s} {'mean':>6s}"
                                                for s in seeds))
    for m in rows:
        key = "student_base" if m == "student base" else m
        cells = []
        for s in seeds:
            r = s.get(key)
            if not r:
                cells.append(" " * 39)
                continue
            p, q = r["private"], r.get("public") or {}
            cells.append(f"{p['exact_match']:10.3f} {q.get('exact_match') or 0:6.3f} {p['loss']:6.3f} {q.get('loss', float('nan')):6.3f} "
                         f"{student_metric(r, st):6.3f}")
        lines.append(f"{m:16s} " + " ".join(cells))
    for m in ("fedkd", "fedkd_xtok"):
        if all(m in s for s in seeds):
            for when in ("teacher_before", "teacher_after"):
                cells = []
                for s in seeds:
                    r = s[m][when]
                    cells.append(f"{r['private']['exact_match']:10.3f} {r['public']['exact_match']:6.3f} {r['private']['loss']:6.3f} "
                                 f"{r['public']['loss']:6.3f} {student_metric(r, st):6.3f}")
                lines.append(f"{(m + ' ' + when.split('_')[1] + ' T'):16s} " + " ".join(cells))
    return lines + bytes_lines(seeds, methods)


def bytes_lines(seeds: list[dict[str, Any]], methods: list[str]) -> list[str]:
    """Bytes each federated method sends per device per round, everything on the wire counted (seed 0)."""
    out = [f"{'bytes/dev/round':16s} {'up kB':>10s} {'down kB':>8s}"]
    for m in methods:
        r = seeds[0].get(m) or {}
        if "upload_bytes_per_device_per_round" in r:
            out.append(f"{m:16s} {r['upload_bytes_per_device_per_round'] / 1e3:10.1f} {r['download_bytes_per_device_per_round'] / 1e3:8.1f}")
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [k for k in results if results[k]["seeds"]]
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(7 * max(1, len(sets)), 4), squeeze=False)
    for ax, name in zip(axes[0], sets):
        text = results[name]["setup"]["text"]
        for m, style in (("fedit", "b"), ("fedkd", "r"), ("fedkd_xtok", "m")):
            for s in results[name]["seeds"]:
                if m not in s:
                    continue
                c = s[m]["curve"]
                ax.plot([x["round"] for x in c], [x["student_private_loss"] if text else x["student_private_em"] for x in c],
                        style + "-", alpha=0.7, label=f"{m} s{s['seed']} private")
                if not text and c[0]["student_public_em"] is not None:
                    ax.plot([x["round"] for x in c], [x["student_public_em"] for x in c], style + "--", alpha=0.7,
                            label=f"{m} s{s['seed']} public")
        ax.set(title=f"{name}: student per round", xlabel="round", ylabel="held-out loss" if text else "held-out exact match")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: synthetic, 1 seed, 2 rounds, < 2 minutes")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--datasets", default="synthetic,alpaca")
    ap.add_argument("--methods", default="local,fedit,fedkd,centralized,fl-minillm,fedkd_xtok")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a Setup field, e.g. distil_steps=10")
    ap.add_argument("--work", default=None, help="where runs go (default: a temporary directory)")
    ap.add_argument("--tag", default="", help="suffix for the result files")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("fl_sim", "fl_lm", "shared", "aggregator", "httpx", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    seeds = [int(x) for x in a.seeds.split(",")]
    methods = a.methods.split(",")
    setups = {"synthetic": SYNTHETIC, "alpaca": TEXT}
    chosen = [setups[x] for x in a.datasets.split(",")]
    if a.quick:
        seeds = seeds[:1]
        chosen = [replace(SYNTHETIC, rounds=2, local_steps=4, student_pretrain=30, teacher_pretrain=30, distil_steps=2,
                          eval_per_family=6)]
        methods = [m for m in methods if m != "fedkd_xtok"]
    if a.rounds:
        chosen = [replace(st, rounds=a.rounds) for st in chosen]
    for kv in a.set:
        k, _, v = kv.partition("=")
        cur = getattr(SYNTHETIC, k)
        chosen = [replace(st, **{k: type(cur)(v) if not isinstance(cur, bool) else v.lower() in ("1", "true", "yes")}) for st in chosen]
    work = Path(a.work or tempfile.mkdtemp(prefix="flm-quality-"))
    t0 = time.monotonic()
    results: dict[str, Any] = {}
    for st in chosen:
        if st.text and not ALPACA.exists():
            log.error("skipping %s: %s is not there (it lives in ../shared/data beside the project, not in it)", st.name, ALPACA)
            results[st.name] = {"setup": asdict(st), "seeds": [], "skipped": f"{ALPACA} not found"}
            continue
        ms = [m for m in methods if not (st.text and m == "fedkd_xtok")]
        per_seed = [one_seed(st, s, work / st.name / f"seed{s}", ms, a.quick) for s in seeds]
        results[st.name] = {"setup": asdict(st), "methods": ms, "seeds": per_seed}
        write_results(a, seeds, results, t0, partial=True)  # an hour of runs is not lost to a later failure
        results[st.name]["targets"] = judge(st, per_seed)
        print(f"\n== {st.name}: {st.devices} devices, {st.rounds} rounds x {st.local_steps} local steps "
              f"({'perplexity, ROUGE-L' if st.text else 'exact match, loss'}; held-out)")
        print("\n".join(table(st, per_seed, ms)))
        print(json.dumps(results[st.name]["targets"], indent=1))
    stem = write_results(a, seeds, results, t0)
    plot(results, ROOT / "benchmarks" / "results" / f"{stem}.png")
    print(f"\nwrote benchmarks/results/{stem}.json and {stem}.png ({time.monotonic() - t0:.0f}s)")
    return 0


def write_results(a: argparse.Namespace, seeds: list[int], results: dict[str, Any], t0: float, partial: bool = False) -> str:
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = ("quality.quick" if a.quick else "quality") + (f".{a.tag}" if a.tag else "")
    doc = {"benchmark": "quality", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "quick": a.quick, "seeds": seeds, "wall_s": round(time.monotonic() - t0, 1),
           "partial": partial, "results": results}
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str))
    return stem


if __name__ == "__main__":
    sys.exit(main())
