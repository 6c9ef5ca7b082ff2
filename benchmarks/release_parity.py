"""The release's parity gate on a finished run's student, fp32 and int8 (issue 21): what the gate
measures on real weights, where on random ones int8 agreement was 3%.

    .venv/bin/python benchmarks/release_parity.py runs/real-fedkd

Loads the run's student base and its last committed adapter (``checkpoints/round_N``), builds the
fp32 release directory and one for each int8 recipe in a temporary directory as the aggregator
does (``fl_lm.onnx_export``), checks each against PyTorch on the run's held-out
prompts (``fl_lm.onnx_parity.check``, the prompts ``aggregator.release`` picks) and writes every
records, passed or not, with sizes and seconds, to ``RUN/release_parity.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("release_parity")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="an fl-sim output directory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    from aggregator.config import load
    from aggregator.model import HostedModel
    from aggregator.release import PARITY_PROMPTS
    from aggregator.server import load_eval
    from fl_lm.data import prompt_text
    from fl_lm.onnx_export import INT8_RECIPES, build_release_dir, quantize_int8
    from fl_lm.onnx_parity import check
    from fl_lm.onnx_session import OnnxLM
    from shared.messages import LoraSpec

    cfg = load(str(args.run / "config" / "aggregator.json"))
    last = max((args.run / "checkpoints").glob("round_*"))
    lora = LoraSpec(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules)
    student = HostedModel("student", cfg.student, lora, seed=cfg.seed, max_seq_len=cfg.max_seq_len,
                          eval_batch_size=cfg.eval_batch_size)
    student.load(last)
    heldout = load_eval(cfg.eval_data, cfg.eval_max_per_family)
    exs = [e for e in heldout if e.prompt][:PARITY_PROMPTS] or heldout[:PARITY_PROMPTS]
    prompts, refs = [prompt_text(student.tok, e) for e in exs], [e.output for e in exs]
    out: dict[str, object] = {"run": str(args.run), "checkpoint": last.name, "student": cfg.student, "params": student.params}
    with tempfile.TemporaryDirectory(prefix="release-parity-") as tmp:
        fp32 = Path(tmp) / "fp32"
        t0 = time.monotonic()
        build_release_dir(cfg.student, fp32, peft_model=student.peft)
        dirs = {"none": (fp32, time.monotonic() - t0)}
        for recipe in INT8_RECIPES:
            t0 = time.monotonic()
            dirs[f"int8:{recipe}"] = (quantize_int8(fp32, Path(tmp) / recipe, recipe), time.monotonic() - t0)
        for name, (d, built_s) in dirs.items():
            t0 = time.monotonic()
            p = check(student.peft, student.tok, OnnxLM(d), prompts, refs, quantization=name.partition(":")[0])
            size = sum(f.stat().st_size for f in d.glob("model.onnx*"))
            out[name] = {**p.to_json(), "model_onnx_bytes": size, "build_s": round(built_s, 1),
                         "check_s": round(time.monotonic() - t0, 1),
                         "loss_ratio": p.loss_onnx / p.loss_torch if p.loss_torch else None}
            log.info("%s: passed %s (%s), max logit diff %.3g, greedy identical %d/%d, next-token agreement %.3f, loss "
                     "%.4f vs %.4f, model.onnx %.1f MB", name, p.passed, p.reason or "ok", p.max_logit_diff,
                     p.greedy_identical, p.prompts, p.token_agreement, p.loss_onnx, p.loss_torch, size / 1e6)
    (args.run / "release_parity.json").write_text(json.dumps(out, indent=2))
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
