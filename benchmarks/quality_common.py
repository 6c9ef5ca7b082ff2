"""What the quality benchmarks share (``quality.py`` on the built-in toy pair, ``quality_real.py`` on
the imported SmolLM2 pair): the Alpaca split by instruction kind, the scoring of generated answers
(ROUGE-L greedy and sampled, perplexity) and its baselines, the in-process LoRA training of
local-only and centralized, and a whole ``fl-sim`` run with what it measured.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.datasets import Example, write_jsonl  # noqa: E402

ALPACA = ROOT.parent / "shared" / "data" / "alpaca-4k.jsonl"
# fl-sim's devices train LoRA on these with the toy pair (fl_sim.run.SIM_LORA_TARGETS): in-process methods use the same.
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


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# -- data -------------------------------------------------------------------------------------
@dataclass
class Data:
    shards: list[list[Example]]
    public: list[Example]
    heldout: dict[str, list[Example]]  # devices' families (synthetic) / instruction kinds (alpaca)
    public_heldout: dict[str, list[Example]]


def kind_of(instruction: str) -> str:
    w = (instruction.split() or [""])[0].strip(",.:;!?\"'").lower()
    return next((k for k, ws in KINDS.items() if w in ws), "other")


def alpaca_data(devices: int, seed: int, n_held: int | None = None, n_public: int | None = None, alpha: float = 0.5,
                limit: int | None = None) -> Data:
    """alpaca-4k shuffled by ``seed``: ``n_held`` held out (default a tenth), ``n_public`` for the
    aggregator alone (default a fifth), the rest split Dirichlet(``alpha``) by kind over ``devices``."""
    from fl_sim import partition
    from shared.datasets import load_file

    if not ALPACA.exists():
        raise FileNotFoundError(f"{ALPACA} is not there (it lives in ../shared/data beside the project, not in it)")
    rows = [Example(e.instruction, e.input, e.output, kind_of(e.instruction)) for e in load_file(ALPACA)]
    random.Random(seed).shuffle(rows)
    if limit:
        rows = rows[:limit]
    n_held = len(rows) // 10 if n_held is None else n_held
    n_pub = len(rows) // 5 if n_public is None else n_public
    held, public, private = rows[:n_held], rows[n_held : n_held + n_pub], rows[n_held + n_pub :]
    shards = partition.split_dirichlet(private, devices, alpha, seed)
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


def balanced(examples: list[Example]) -> list[Example]:
    """Every family repeated up to the largest one's size, so each is drawn equally often (as the
    aggregator's distillation draws them): otherwise the big public families would crowd out the
    devices' ones in the pooled set."""
    by: dict[str, list[Example]] = {}
    for e in examples:
        by.setdefault(e.family, []).append(e)
    top = max(len(v) for v in by.values())
    return [v[i % len(v)] for v in by.values() for i in range(top)]


# -- scoring ----------------------------------------------------------------------------------
def token_loss(model: Any, tok: Any, exs: list[Example], max_len: int, batch_size: int = 64) -> tuple[float, int]:
    """(summed cross-entropy, number) of the reference answers' tokens, teacher-forced."""
    import torch

    from fl_lm.data import IGNORE, collate, encode_example
    from fl_lm.device import of_model

    pl = of_model(model)
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(exs), batch_size):
            b = pl.put(collate(tok, [encode_example(tok, e, max_len) for e in exs[i : i + batch_size]]))
            with pl.autocast():
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()  # (B, T, V)
            lab = b["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), lab.reshape(-1),
                                                             ignore_index=IGNORE, reduction="sum"))
            n += int((lab != IGNORE).sum())
    return total, max(1, n)


def generate(model: Any, tok: Any, exs: list[Example], max_len: int, new_tokens: int, sample: bool = False, seed: int = 0,
             batch_size: int = 32) -> list[str]:
    """Answers to the prompts (through the chat template where the tokenizer has one): greedy, or
    pure sampling (top-k 0, top-p 1, T 1) as MiniLLM scores long generations."""
    import torch

    from fl_lm.data import prompt_text
    from fl_lm.device import of_model

    pl = of_model(model)
    prompts = [prompt_text(tok, e) for e in exs]
    out: list[str] = []
    old = tok.padding_side
    tok.padding_side = "left"
    torch.manual_seed(seed)
    model.eval()
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_len,
                      add_special_tokens=False)
            with torch.no_grad(), pl.autocast():
                g = model.generate(**pl.put(dict(enc)), max_new_tokens=new_tokens, do_sample=sample, top_k=0 if sample else None,
                                   top_p=1.0 if sample else None, temperature=1.0 if sample else None,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out += tok.batch_decode(g[:, enc["input_ids"].shape[1] :].cpu(), skip_special_tokens=True)
    finally:
        tok.padding_side = old
    return out


def rouge_scores(exs: list[Example], preds: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [sc.score(e.output, p)["rougeL"].fmeasure for e, p in zip(exs, preds)]


def rouge_l(model: Any, tok: Any, exs: list[Example], max_len: int, new_tokens: int, sample: bool = False) -> float:
    preds = generate(model, tok, exs, max_len, new_tokens, sample)
    return sum(rouge_scores(exs, preds)) / len(exs)


def text_baselines(tok: Any, train: list[Example], held: list[Example]) -> dict[str, Any]:
    """Uniform (ln V) and unigram (add-one, fitted on all training responses) cross-entropy per
    response token, and the ROUGE-L of echoing the input back (the laziest answer)."""
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
    echo = rouge_scores(held, [e.input or e.instruction for e in held])
    return {"uniform": {"loss": math.log(v), "perplexity": float(v)},
            "unigram": {"loss": ce / n, "perplexity": math.exp(ce / n)},
            "echo_input_rouge_l": sum(echo) / len(echo)}


# -- methods ----------------------------------------------------------------------------------
def lora_spec(r: int, targets: tuple[str, ...] = LORA_TARGETS) -> Any:
    from shared.messages import LoraSpec

    return LoraSpec(r=r, alpha=2.0 * r, dropout=0.0, target_modules=targets)


def train_in_process(student: str, examples: list[Example], steps: int, *, lr: float, lora_r: int, batch_size: int,
                     max_len: int, seed: int, threads: int = 1, device: str = "cpu",
                     targets: tuple[str, ...] = LORA_TARGETS) -> tuple[Any, Any, Any]:
    """A fresh LoRA on ``student`` trained as a device trains (``fl_lm.train``), on ``device``
    (``fl_lm.device``: cpu, auto, cuda): (model, tokenizer, result)."""
    import torch

    from fl_lm.device import place, resolve
    from fl_lm.loading import load_model, load_tokenizer
    from fl_lm.lora import attach_lora
    from fl_lm.train import train_lora

    torch.set_num_threads(threads)
    tok = load_tokenizer(student)
    peft = attach_lora(place(load_model(student), resolve(device)), lora_spec(lora_r, targets), seed=seed)
    res = train_lora(peft, tok, examples, steps=steps, lr=lr, batch_size=batch_size, max_len=max_len, seed=seed)
    return peft, tok, res


def mean_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Average a list of result dicts (numbers only, nested alike), e.g. over local-only devices."""
    def avg(xs: list[Any]) -> Any:
        if all(isinstance(x, dict) for x in xs):
            return {k: avg([x[k] for x in xs]) for k in xs[0] if all(k in x for x in xs)}
        nums = [x for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool)]
        return sum(nums) / len(nums) if nums else None

    return avg(results)


def load_checkpoint(base: str, ckpt: Path) -> tuple[Any, Any]:
    from peft import PeftModel

    from fl_lm.loading import load_model, load_tokenizer

    return PeftModel.from_pretrained(load_model(base), str(ckpt)), load_tokenizer(base)


@contextlib.contextmanager
def aggregator_config_extra(extra: dict[str, Any] | None) -> Iterator[None]:
    """Merge ``extra`` into the aggregator's config file as ``fl-sim`` writes it.

    For aggregator settings ``fl_sim.run.SimSettings`` does not carry (distillation batch, MiniLLM
    rollout sizes, the aggregator's threads, the ONNX release): a benchmark of the real pair on 2
    cores needs them, a user of ``fl-sim`` has the aggregator's own config file. The aggregator
    refuses unknown keys, so a misspelt one fails the run at start rather than being ignored.
    """
    from fl_sim import prepare

    if not extra:
        yield
        return
    original = prepare.write_json

    def merged(base: dict[str, Any], add: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for k, v in add.items():
            out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    def write_json(path: Path, obj: Any) -> Any:
        return original(path, merged(obj, extra) if Path(path).name == "aggregator.json" else obj)

    prepare.write_json = write_json  # type: ignore[assignment]
    try:
        yield
    finally:
        prepare.write_json = original  # type: ignore[assignment]


def run_sim(s: Any, aggregator_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A whole ``fl-sim`` run of settings ``s`` (``fl_sim.run.SimSettings``): its state, wall time,
    rounds completed, bytes per device per round, distillation seconds and per-round curve."""
    from aggregator.record import read
    from fl_sim.run import finish, launch

    out = Path(s.out)
    t0 = time.monotonic()
    with aggregator_config_extra(aggregator_extra):
        run = launch(s)
    finish(run)
    rows = read(out / "metrics.jsonl")
    state = json.loads((out / "state.json").read_text())
    rounds = [r for r in rows if r.round > 0]
    n_dev = max(1, s.devices)
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
