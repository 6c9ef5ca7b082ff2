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
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.datasets import Example, write_jsonl  # noqa: E402

log = logging.getLogger("quality")
ALPACA = ROOT.parent / "shared" / "data" / "alpaca-4k.jsonl"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens")

# Instruction kinds of Alpaca, by the first word: devices get a Dirichlet mix of kinds.
KINDS = {
    "create": {"generate", "create", "write", "compose", "design", "construct", "come", "suggest", "provide", "make",
               "develop", "invent", "brainstorm", "produce", "draft", "imagine", "formulate", "propose", "build"},
    "explain": {"describe", "explain", "summarize", "compare", "discuss", "analyze", "analyse", "outline", "evaluate",
                "tell", "contrast", "illustrate", "predict", "justify"},
    "question": {"what", "how", "why", "who", "which", "when", "where", "is", "are", "can", "do", "does", "should"},
    "transform": {"rewrite", "edit", "given", "classify", "identify", "find", "calculate", "convert", "translate",
                  "categorize", "sort", "determine", "detect", "rearrange", "correct", "paraphrase", "change", "reverse",
                  "delete", "replace", "combine", "select", "choose", "assign", "extract", "rank", "arrange"},
    "list": {"name", "list", "give", "state", "enumerate", "recommend", "offer", "add"},
}


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


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__}


# -- data -------------------------------------------------------------------------------------
@dataclass
class Data:
    shards: list[list[Example]]
    public: list[Example]
    heldout: dict[str, list[Example]]  # devices' families (synthetic) / instruction kinds (alpaca)
    public_heldout: dict[str, list[Example]]


def synthetic_data(st: Setup, seed: int) -> Data:
    from fl_sim import prepare

    d = prepare.generated(st.devices, 200, st.eval_per_family, "dirichlet", 0.5, seed)
    return Data(d.shards, d.public, d.heldout, d.public_heldout)


def kind_of(instruction: str) -> str:
    w = (instruction.split() or [""])[0].strip(",.:;!?\"'").lower()
    return next((k for k, ws in KINDS.items() if w in ws), "other")


def alpaca_data(st: Setup, seed: int, limit: int | None = None) -> Data:
    from fl_sim import partition
    from shared.datasets import load_file

    rows = load_file(ALPACA)
    rows = [Example(e.instruction, e.input, e.output, kind_of(e.instruction)) for e in rows]
    random.Random(seed).shuffle(rows)
    if limit:
        rows = rows[:limit]
    n_held, n_pub = len(rows) // 10, len(rows) // 5
    held, public, private = rows[:n_held], rows[n_held : n_held + n_pub], rows[n_held + n_pub :]
    shards = partition.split_dirichlet(private, st.devices, 0.5, seed)
    by_kind: dict[str, list[Example]] = {}
    for e in held:
        by_kind.setdefault(e.family, []).append(e)
    return Data(shards, public, by_kind, {})


def write_layout(work: Path, d: Data) -> dict[str, Path]:
    dev_dir = work / "data" / "devices"
    for i, s in enumerate(d.shards):
        write_jsonl(dev_dir / f"device-{i}.jsonl", s)
    write_jsonl(work / "data" / "public.jsonl", d.public)
    for fam, exs in d.heldout.items():
        write_jsonl(work / "data" / "eval" / f"{fam}.jsonl", exs)
    paths = {"devices": dev_dir, "public": work / "data" / "public.jsonl", "eval": work / "data" / "eval"}
    if d.public_heldout:
        for fam, exs in d.public_heldout.items():
            write_jsonl(work / "data" / "public_eval" / f"{fam}.jsonl", exs)
        paths["public_eval"] = work / "data" / "public_eval"
    return paths


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
        tot_loss, tot_tok = _token_loss(model, tok, exs, st.max_len)
        out["perplexity"] = math.exp(tot_loss / tot_tok)
        out["rouge_l"] = rouge_l(model, tok, exs, st)
        # Pure sampling (top-k 0, top-p 1, T 1), as MiniLLM scores long generations, beside greedy.
        out["rouge_l_sampled"] = rouge_l(model, tok, exs, st, sample=True)
    return out


def _token_loss(model: Any, tok: Any, exs: list[Example], max_len: int) -> tuple[float, int]:
    import torch

    from fl_lm.data import IGNORE, collate, encode_example

    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(exs), 64):
            b = collate(tok, [encode_example(tok, e, max_len) for e in exs[i : i + 64]])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            lab = b["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), lab.reshape(-1),
                                                             ignore_index=IGNORE, reduction="sum"))
            n += int((lab != IGNORE).sum())
    return total, max(1, n)


def generate(model: Any, tok: Any, prompts: list[str], st: Setup, sample: bool = False, seed: int = 0) -> list[str]:
    import torch

    out: list[str] = []
    old = tok.padding_side
    tok.padding_side = "left"
    torch.manual_seed(seed)
    try:
        for i in range(0, len(prompts), 32):
            enc = tok(prompts[i : i + 32], return_tensors="pt", padding=True, truncation=True, max_length=st.max_len,
                      add_special_tokens=False)
            with torch.no_grad():
                g = model.generate(**enc, max_new_tokens=st.gen_tokens, do_sample=sample, top_k=0 if sample else None,
                                   top_p=1.0 if sample else None, temperature=1.0 if sample else None,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out += tok.batch_decode(g[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tok.padding_side = old
    return out


def rouge_l(model: Any, tok: Any, exs: list[Example], st: Setup, sample: bool = False) -> float:
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    preds = generate(model, tok, [e.prompt for e in exs], st, sample)
    return sum(sc.score(e.output, p)["rougeL"].fmeasure for e, p in zip(exs, preds)) / len(exs)


def text_baselines(tok: Any, train: list[Example], held: list[Example]) -> dict[str, Any]:
    """Uniform (ln V) and unigram (add-one, fitted on all training responses) cross-entropy per
    response token, and the ROUGE-L of echoing the input back (the laziest answer)."""
    from rouge_score import rouge_scorer

    def resp(e: Example) -> list[int]:
        return tok(e.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    v = len(tok)
    counts = Counter(t for e in train for t in resp(e))
    total = sum(counts.values())
    ce, n = 0.0, 0
    for e in held:
        for t in resp(e):
            ce -= math.log((counts.get(t, 0) + 1) / (total + v))
            n += 1
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    echo = sum(sc.score(e.output, e.input or e.instruction)["rougeL"].fmeasure for e in held) / len(held)
    return {"uniform": {"loss": math.log(v), "perplexity": float(v)},
            "unigram": {"loss": ce / n, "perplexity": math.exp(ce / n)},
            "echo_input_rouge_l": echo}


# -- methods ----------------------------------------------------------------------------------
def lora_spec(st: Setup) -> Any:
    from shared.messages import LoraSpec

    return LoraSpec(r=st.lora_r, alpha=2.0 * st.lora_r, dropout=0.0, target_modules=LORA_TARGETS)


def train_in_process(student: str, examples: list[Example], steps: int, st: Setup, seed: int) -> tuple[Any, Any]:
    import torch

    from fl_lm.loading import load_model, load_tokenizer
    from fl_lm.lora import attach_lora
    from fl_lm.train import train_lora

    torch.set_num_threads(1)
    tok = load_tokenizer(student)
    peft = attach_lora(load_model(student), lora_spec(st), seed=seed)
    train_lora(peft, tok, examples, steps=steps, lr=st.learning_rate, batch_size=st.batch_size, max_len=st.max_len, seed=seed)
    return peft, tok


def balanced(examples: list[Example]) -> list[Example]:
    """Every family repeated up to the largest one's size, so each is drawn equally often (as the
    aggregator's distillation draws them): otherwise the big public families would crowd out the
    devices' ones in the pooled set."""
    by: dict[str, list[Example]] = {}
    for e in examples:
        by.setdefault(e.family, []).append(e)
    top = max(len(v) for v in by.values())
    return [v[i % len(v)] for v in by.values() for i in range(top)]


def eval_all(model: Any, tok: Any, d: Data, st: Setup) -> dict[str, Any]:
    return {"private": score(model, tok, d.heldout, st), "public": score(model, tok, d.public_heldout, st) if d.public_heldout else None}


def mean_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Average a list of eval_all results (numbers only), e.g. over local-only devices."""
    def avg(xs: list[Any]) -> Any:
        if all(isinstance(x, dict) for x in xs):
            return {k: avg([x[k] for x in xs]) for k in xs[0]}
        nums = [x for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool)]
        return sum(nums) / len(nums) if nums else None

    return avg(results)


def load_checkpoint(base: str, ckpt: Path) -> tuple[Any, Any]:
    from peft import PeftModel

    from fl_lm.loading import load_model, load_tokenizer

    return PeftModel.from_pretrained(load_model(base), str(ckpt)), load_tokenizer(base)


def run_sim(work: Path, name: str, layout: dict[str, Path], student: str, teacher: str | None, mode: str, st: Setup,
            seed: int, quick: bool) -> dict[str, Any]:
    from aggregator.record import read
    from fl_sim.run import SimSettings, finish, launch

    out = work / name
    s = SimSettings(devices=st.devices, rounds=st.rounds, out=str(out), data=str(layout["devices"]),
                    public_data=str(layout["public"]), eval_data=str(layout["eval"]),
                    public_eval_data=str(layout["public_eval"]) if "public_eval" in layout else None,
                    student=student, teacher=teacher, mode=mode, local_steps=st.local_steps,
                    learning_rate=st.learning_rate, lora_r=st.lora_r, distil_steps=st.distil_steps, distil_lr=st.distil_lr,
                    teacher_lr=st.teacher_lr, seed=seed,
                    eval_per_family=4 if quick else min(st.eval_per_family, 30), round_timeout_s=900.0)
    t0 = time.monotonic()
    finish(launch(s))
    rows = read(out / "metrics.jsonl")
    state = json.loads((out / "state.json").read_text())
    rounds = [r for r in rows if r.round > 0]
    n_dev = max(1, st.devices)
    up = sum(sum(r.bytes_up.values()) for r in rounds) / n_dev / max(1, len(rounds))
    down = sum(sum(r.bytes_down.values()) for r in rounds) / n_dev / max(1, len(rounds))
    return {"out": out, "state": state, "wall_s": round(time.monotonic() - t0, 1), "rounds_ok": sum(r.status == "ok" for r in rounds),
            "upload_bytes_per_device_per_round": up, "download_bytes_per_device_per_round": down,
            "distil_s_per_round": (sum(r.distil["seconds"] for r in rounds if r.distil) / len(rounds)) if rounds and rounds[-1].distil else 0.0,
            "curve": [{"round": r.round, "student_private_loss": r.student.private.mean_loss,
                       "student_private_em": r.student.private.mean_exact_match,
                       "student_public_loss": r.student.public.mean_loss if r.student.public else None,
                       "student_public_em": r.student.public.mean_exact_match if r.student.public else None,
                       "teacher_private_loss": r.teacher.private.mean_loss if r.teacher else None,
                       "teacher_private_em": r.teacher.private.mean_exact_match if r.teacher else None}
                      for r in rows]}


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
