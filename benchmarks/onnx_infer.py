"""ONNX Runtime (fp32, int8) against PyTorch eager ``generate`` on the same model, prompts and token counts.

    python benchmarks/onnx_infer.py           # demo student and a Qwen2.5-0.5B-shaped student
    python benchmarks/onnx_infer.py --quick   # demo student only, fewer tokens, < 2 minutes

Each engine runs in its own spawned process (so its peak resident memory, VmHWM, is its own),
on the same thread count, greedy, every prompt continued by exactly ``tokens`` new tokens (EOS
ignored, so every engine does the same work). Tokens per second count new tokens over the whole
request (prefill included), after one warm-up request. Exactness: the fp32 engine's greedy tokens
against torch's, token for token; int8 the share of identical tokens up to the first difference.
The models are randomly initialized from configs (no hub): speed and memory depend on shapes,
not on weights. Writes ``benchmarks/results/onnx_infer[.quick].json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("onnx_infer")
ALPACA = ROOT.parent / "shared" / "data" / "alpaca-4k.jsonl"

PROMPTS = ["### Instruction:\nAdd one.\n### Input:\n41\n### Response:\n",
           "### Instruction:\nName a colour.\n### Response:\n",
           "Once upon a time there was a small device that",
           "### Instruction:\nCount the words.\n### Input:\nthe cat sat on the mat\n### Response:\n"]
# Qwen2.5-0.5B's published configuration (config.json of Qwen/Qwen2.5-0.5B), randomly initialized.
QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
              rms_norm_eps=1e-6, tie_word_embeddings=True)


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__}


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _engine(kind: str, model_dir: str, release: str, tokens: int, threads: int, texts: list[str], q: Any) -> None:
    """One engine in its own process: warm up, then every prompt; report speed, memory, tokens."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in texts]
    outs: list[list[int]] = []
    if kind == "torch":
        from fl_lm.loading import load_model

        model = load_model(model_dir).eval()

        def run(ids: list[int]) -> list[int]:
            with torch.no_grad():
                g = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                   pad_token_id=tok.pad_token_id or tok.eos_token_id)
            return g[0, len(ids):].tolist()
    else:
        from fl_lm.onnx_session import OnnxLM, Sampling

        lm = OnnxLM(release, threads=threads)
        s = Sampling(max_new_tokens=tokens, ignore_eos=True)

        def run(ids: list[int]) -> list[int]:
            return lm.generate_ids(ids, s)
    run(prompts[0][:4])  # warm-up
    t = time.perf_counter()
    for ids in prompts:
        outs.append(run(ids))
    wall = time.perf_counter() - t
    n = sum(len(o) for o in outs)
    q.put({"engine": kind, "tokens": n, "seconds": wall, "tokens_per_s": n / wall, "peak_rss_mb": _peak_mb(),
           "outputs": outs, "np": np.__version__})


def _spawn(kind: str, model_dir: Path, release: Path, tokens: int, threads: int, texts: list[str]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_engine, args=(kind, str(model_dir), str(release), tokens, threads, texts, q))
    p.start()
    res = q.get(timeout=3600)
    p.join()
    return res


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def real_prompts(model_dir: Path, n: int) -> tuple[list[str], list[str]]:
    """The last n Alpaca records of ../shared/data (held out from nothing here: these models were
    not trained on this run), through the model's chat template: prompts and reference answers."""
    from fl_lm.loading import load_tokenizer
    from shared.datasets import load_file

    tok = load_tokenizer(str(model_dir))
    exs = load_file(ALPACA)[-n:]
    prompts = []
    for e in exs:
        user = e.instruction + (f"\n\n{e.input}" if e.input else "")
        prompts.append(tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True))
    return prompts, [e.output for e in exs]


def parity(model_dir: Path, releases: dict[str, Path], prompts: list[str], refs: list[str], threads: int) -> dict[str, Any]:
    """The release's own gate (fl_lm.onnx_parity) on real weights: fp32 logit difference and greedy
    identity, int8 next-token agreement (teacher-forced) and held-out loss against PyTorch."""
    import torch

    from fl_lm import onnx_parity
    from fl_lm.loading import load_model, load_tokenizer
    from fl_lm.onnx_session import OnnxLM

    torch.set_num_threads(threads)
    tok, model = load_tokenizer(str(model_dir)), load_model(str(model_dir)).eval()
    out = {}
    for q, d in releases.items():
        p = onnx_parity.check(model, tok, OnnxLM(d, threads=threads), prompts, refs,
                              quantization="int8" if q.startswith("int8") else "none")
        out[q] = p.to_json()
        log.info("parity %s: max logit diff %.2g, token agreement %.3f, loss torch %.4f onnx %.4f, passed %s (%s)", q,
                 p.max_logit_diff, p.token_agreement, p.loss_torch, p.loss_onnx, p.passed, p.reason)
    return out


# Engine -> int8 recipe (None: fp32). On real weights both recipes run: "full" (onnxruntime's
# default, every MatMul and the embedding) and "outlier-safe", the one the release falls back to
# when "full" fails the parity gate (fl_lm.onnx_export.INT8_RECIPES).
RECIPES = {"fp32": None, "int8": "full", "int8-outlier-safe": "outlier-safe"}


def bench_model(name: str, model_dir: Path, work: Path, tokens: int, threads: int, texts: list[str] | None = None,
                refs: list[str] | None = None) -> dict[str, Any]:
    from fl_lm.onnx_export import build_release_dir

    texts = texts or PROMPTS
    quants = [q for q in RECIPES if refs is not None or q != "int8-outlier-safe"]
    rel = {}
    sizes = {}
    for q in quants:
        t = time.monotonic()
        d = work / f"{name}-{q}"
        build_release_dir(str(model_dir), d, int8=RECIPES[q] is not None, recipe=RECIPES[q] or "full")
        rel[q] = d
        sizes[q] = sum(p.stat().st_size for p in d.iterdir() if p.name.startswith("model.onnx"))
        log.info("%s: %s release built in %.0fs (%.1f MB of ONNX)", name, q, time.monotonic() - t, sizes[q] / 1e6)
    res = {}
    for kind in ("torch", *quants):
        res[kind] = _spawn(kind, model_dir, rel.get(kind, rel["fp32"]), tokens, threads, texts)
        log.info("%s %s: %.1f tokens/s, peak RSS %.0f MB", name, kind, res[kind]["tokens_per_s"], res[kind]["peak_rss_mb"])
    ref = res["torch"]["outputs"]
    for kind in quants:
        o = res[kind]["outputs"]
        res[kind]["identical_prompts"] = sum(a == b for a, b in zip(ref, o))
        res[kind]["prefix_agreement"] = sum(_prefix(a, b) for a, b in zip(ref, o)) / max(1, sum(map(len, ref)))
        res[kind]["speedup_vs_torch"] = res[kind]["tokens_per_s"] / res["torch"]["tokens_per_s"]
    for r in res.values():
        r.pop("outputs")
        r.pop("np", None)
    import json as _j

    params = _j.loads((model_dir / "config.json").read_text())
    out = {"model": name, "config": {k: params.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
           "prompts": len(texts), "onnx_bytes": sizes, "int8_size_ratio": sizes["fp32"] / sizes["int8"], "engines": res,
           "int8_recipes": {q: RECIPES[q] for q in quants if RECIPES[q]}}
    if refs is not None:
        out["parity"] = parity(model_dir, rel, texts, refs, threads)
    return out


def _demo_student(out: Path) -> Path:
    from fl_sim.models_cli import build_default

    return Path(build_default(out, seed=0, pretrain_steps=100, teacher_pretrain_steps=0)["student"])


def _qwen_shaped(out: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = Qwen2Config(**QWEN05, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | engine | tokens/s | x torch | peak RSS MB | greedy identical | token agreement | ONNX MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for kind in r["engines"]:
            e = r["engines"][kind]
            mb = "" if kind == "torch" else f"{r['onnx_bytes'][kind] / 1e6:.1f}"
            ident = "" if kind == "torch" else f"{e['identical_prompts']}/{r.get('prompts', len(PROMPTS))}"
            agree = "" if kind == "torch" else f"{e['prefix_agreement']:.3f}"
            x = "1.00" if kind == "torch" else f"{e['speedup_vs_torch']:.2f}"
            lines.append(f"| {r['model']} | {kind} | {e['tokens_per_s']:.1f} | {x} | {e['peak_rss_mb']:.0f} | {ident} | {agree} | {mb} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per prompt (default 64, quick 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--real", default=None, metavar="DIR",
                    help="a real model (save_pretrained dir, e.g. models/real/student from `make models-real`) instead of the "
                         "random ones, on Alpaca prompts through its chat template, with the release's parity gate on "
                         "real weights; writes onnx_infer_real[.quick].json")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    tokens = a.tokens or (16 if a.quick else 64)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as tmp:
        work = Path(tmp)
        if a.real:
            texts, refs = real_prompts(Path(a.real), 4 if a.quick else 16)
            results = [bench_model("real", Path(a.real), work, tokens, a.threads, texts, refs)
                       | {"model": f"real student ({Path(a.real).name})"}]
        else:
            demo = _demo_student(work / "demo")
            models = [("demo student", demo)]
            if not a.quick:
                models.append(("Qwen2.5-0.5B config", _qwen_shaped(work / "qwen05", demo)))
            results = [bench_model(n.replace(" ", "-"), d, work, tokens, a.threads) | {"model": n} for n, d in models]
    out = {"benchmark": "onnx_infer", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "quick": a.quick, "tokens_per_prompt": tokens, "prompts": len(PROMPTS),
           "threads": a.threads, "wall_s": round(time.monotonic() - t0, 1), "results": results}
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    name = "onnx_infer_real" if a.real else "onnx_infer"
    path = res_dir / (f"{name}.quick.json" if a.quick else f"{name}.json")
    path.write_text(json.dumps(out, indent=2))
    sys.stdout.write(table(results) + f"\n\nwrote {path} ({out['wall_s']:.0f}s)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
