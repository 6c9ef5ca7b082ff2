"""Measured leakage, with and without distributed DP (issue 24, acceptance 3).

Whole ``fl-sim`` runs (broker, aggregator, 3 devices as processes; secure aggregation on, dense
updates, FedIT) on the learnable synthetic set-up, with random secrets planted in device-0's
private data. For no DP and for two accountant epsilons (the noise multiplier calibrated so the
run's rounds reach that epsilon at delta 1e-5), per seed:

- **canary exposure** of each secret on the released ONNX student (onnxruntime), its rank
  estimated among a uniform sample of the other 10^6 - 1 codes (``fl_sim.leakage.exposure``);
- **membership inference**: per-example loss of the released student, calibrated by the base
  student's loss on the same example (a reference model, in the spirit of LiRA), members drawn
  from the devices' training shards and non-members from the same families' held-out examples;
  AUC and TPR at 0.1 % FPR;
- **one-shot empirical epsilon** (Andrew et al. 2024): 100 canary clients with random isotropic
  directions, of the DP clip's norm (no DP: the norm of the fleet's mean update per round), added
  to every completed round's secure sum after the fact (the sum is linear, so this is what those
  clients' masked inputs would have added; their own noise shares are left out, which can only
  raise the estimate), against 100 directions that never took part;
- the **accountant's epsilon** (``metrics.jsonl``) and the **utility cost**: held-out exact match
  and loss of the final student beside the no-DP run's.

    python benchmarks/privacy_audit.py            # full: 2 seeds, no DP / eps 8 / eps 2, 10 rounds
    python benchmarks/privacy_audit.py --quick    # smoke (< 2 minutes of rounds): 1 seed, no DP / eps 8, 2 rounds

Writes ``benchmarks/results/privacy_audit[.quick].json``.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from quality_common import ROOT, Data, machine, write_layout

from shared.datasets import Example

log = logging.getLogger("privacy_audit")
DELTA = 1e-5


@dataclass(frozen=True)
class Setup:
    devices: int = 3
    rounds: int = 10
    local_steps: int = 30
    learning_rate: float = 2e-3
    lora_r: int = 8
    per_family: int = 120  # private examples per family before the Dirichlet split
    eval_per_family: int = 60
    canaries: int = 4
    repeats: int = 10  # copies of each secret in device-0's shard
    alternatives: int = 2000  # sampled other codes per secret
    members: int = 300
    canary_clients: int = 100
    pretrain: int = 800
    epsilons: tuple[float, ...] = (8.0, 2.0)
    seeds: tuple[int, ...] = (0, 1)


QUICK = Setup(rounds=2, local_steps=5, per_family=40, eval_per_family=20, alternatives=200, members=60, canary_clients=50,
              pretrain=100, epsilons=(8.0,), seeds=(0,))


def noise_for(epsilon: float, rounds: int, delta: float = DELTA) -> float:
    """The noise multiplier whose ``rounds`` Gaussian mechanisms reach ``epsilon`` at ``delta``
    (dp-accounting's RDP accountant); the run's own Skellam accountant then reports what it got."""
    from shared.dp_account import gaussian_epsilon

    lo, hi = 0.05, 200.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if gaussian_epsilon(mid, rounds, delta) > epsilon else (lo, mid)
    return hi


# -- data -------------------------------------------------------------------------------------
def data_with_canaries(st: Setup, seed: int) -> tuple[Data, list[Any]]:
    from fl_sim import leakage, prepare

    d = prepare.generated(st.devices, st.per_family, st.eval_per_family, "dirichlet", 0.5, seed)
    canaries = leakage.make_canaries(st.canaries, seed)
    shard0 = list(d.shards[0]) + [replace(c.example(), family="canary") for c in canaries for _ in range(st.repeats)]
    return Data([shard0, *d.shards[1:]], d.public, d.heldout, d.public_heldout), canaries


# -- scoring on the released student ----------------------------------------------------------
def completion_logprobs(lm: Any, examples: list[Example], max_len: int = 128, batch: int = 64) -> list[float]:
    """Sum of log p(output tokens | prompt) under the ONNX release, per example (right padding:
    the model is causal, so padding after a sequence changes nothing before it)."""
    import numpy as np

    from fl_lm.data import encode_example

    enc = [encode_example(lm.tok, e, max_len) for e in examples]
    out: list[float] = []
    pad = lm.tok.pad_token_id if lm.tok.pad_token_id is not None else lm.tok.eos_token_id
    for i in range(0, len(enc), batch):
        part = enc[i:i + batch]
        t = max(len(ids) for ids, _ in part)
        ids = np.full((len(part), t), pad, dtype=np.int64)
        for j, (x, _) in enumerate(part):
            ids[j, :len(x)] = x
        logits, _ = lm.forward(ids)
        logits = logits.astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        for j, (x, labels) in enumerate(part):
            lp = 0.0
            for pos in range(1, len(x)):
                if labels[pos] != -100:
                    lp += float(logits[j, pos - 1, labels[pos]] - logz[j, pos - 1])
            out.append(lp)
    return out


class TorchLM:
    """The global adapter of a checkpoint, with OnnxLM's ``tok`` and ``forward`` (logits only)."""

    def __init__(self, base: str, ckpt: Path) -> None:
        from quality_common import load_checkpoint

        self.model, self.tok = load_checkpoint(base, ckpt)
        self.model.eval()
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token

    def forward(self, ids: Any) -> tuple[Any, None]:
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(ids)).logits.float().numpy(), None


def base_logprobs(student: str, examples: list[Example], max_len: int = 128) -> list[float]:
    """The same under the base student (no adapter): the reference that calibrates each example."""
    import torch

    from fl_lm.data import encode_example
    from fl_lm.loading import load_model, load_tokenizer

    tok, model = load_tokenizer(student), load_model(student)
    model.eval()
    out = []
    with torch.no_grad():
        for e in examples:
            ids, labels = encode_example(tok, e, max_len)
            logits = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
            out.append(float(sum(logits[p - 1, labels[p]] for p in range(1, len(ids)) if labels[p] != -100)))
    return out


# -- the final model delta --------------------------------------------------------------------
def adapter_vector(ckpt: Path) -> Any:
    import numpy as np
    from safetensors.numpy import load_file

    w = load_file(str(ckpt / "adapter_model.safetensors"))
    return np.concatenate([w[k].astype(np.float64).ravel() for k in sorted(w)])


def one_shot(out: Path, rows: list[dict[str, Any]], st: Setup, seed: int, canary_norm: float) -> dict[str, Any]:

    from fl_sim import leakage

    ck = sorted((out / "checkpoints").glob("round_*"))
    first, last = adapter_vector(ck[0]), adapter_vector(ck[-1])
    delta = last - first
    ok = [r for r in rows if r["round"] > 0 and r["status"] == "ok"]
    k, dim = st.canary_clients, delta.size
    ins, null = leakage.canary_directions(k, dim, 2 * seed + 1), leakage.canary_directions(k, dim, 2 * seed + 2)
    # k canary clients beside the n devices in every completed round: the mean over n + k.
    n = st.devices
    emulated = delta * n / (n + k) + len(ok) * canary_norm * ins.sum(0) / (n + k)
    est = leakage.one_shot_epsilon(emulated, ins, null, DELTA)
    return {"epsilon": est.epsilon, "cos_inserted": [est.inserted_mean, est.inserted_std], "cos_null": [est.null_mean, est.null_std],
            "canary_norm": canary_norm, "dim": int(dim), "rounds_ok": len(ok)}


def mean_update_norm(out: Path) -> float:
    import numpy as np

    vecs = [adapter_vector(p) for p in sorted((out / "checkpoints").glob("round_*"))]
    steps = [float(np.linalg.norm(b - a)) for a, b in zip(vecs, vecs[1:])]
    return float(np.median(steps)) if steps else 1.0


def accountant_epsilon(rows: list[dict[str, Any]]) -> float | None:
    for r in reversed(rows):
        for key in ("privacy", "dp"):
            v = r.get(key)
            if isinstance(v, dict) and isinstance(v.get("epsilon"), (int, float)):
                return float(v["epsilon"])
    return None


# -- one run ----------------------------------------------------------------------------------
def run_one(work: Path, name: str, layout: dict[str, Path], models: dict[str, str], st: Setup, seed: int,
            dp: dict[str, Any] | None) -> dict[str, Any]:
    from quality_common import run_sim

    from fl_sim.run import SimSettings

    s = SimSettings(devices=st.devices, rounds=st.rounds, out=str(work / name), data=str(layout["devices"]),
                    public_data=str(layout["public"]), eval_data=str(layout["eval"]), student=models["student"], mode="fedit",
                    local_steps=st.local_steps, learning_rate=st.learning_rate, lora_r=st.lora_r, seed=seed,
                    eval_per_family=min(st.eval_per_family, 30), round_timeout_s=900.0, density=1.0)
    extra = {"dp": {"enabled": True, **dp}} if dp else None
    t0 = time.monotonic()
    res = run_sim(s, extra)
    rows = [json.loads(x) for x in (Path(s.out) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = [r for r in rows if r["round"] > 0]
    final = last[-1] if last else {}
    return {"name": name, "wall_s": round(time.monotonic() - t0, 1), "rounds_ok": res["rounds_ok"], "out": s.out,
            "student": models["student"],
            "rows": rows, "exact_match": final.get("mean_exact_match"), "loss": final.get("mean_loss"),
            "accountant_epsilon": accountant_epsilon(rows)}


def audit(run: dict[str, Any], data: Data, canaries: list[Any], base: dict[str, list[float]], st: Setup, seed: int,
          canary_norm: float) -> dict[str, Any]:
    from fl_lm.onnx_session import OnnxLM
    from fl_sim import leakage

    out = Path(run["out"])
    latest_file = out / "releases" / "latest.json"
    if latest_file.exists():
        rel = out / "releases" / str(json.loads(latest_file.read_text())["release_id"])
        lm: Any = OnnxLM(rel, threads=2)
        scored = rel.name
    else:
        # No release: the run's last rounds were abandoned (under heavy noise the devices' training
        # diverged and they declined non-finite updates). What an attacker holds then is the last
        # committed global adapter: scored with torch instead.
        ck = sorted((out / "checkpoints").glob("round_*"))[-1]
        lm = TorchLM(run["student"], ck)
        scored = f"no release; checkpoint {ck.name} (torch)"
    exposures = []
    for c in canaries:
        alts = leakage.alternative_codes(c, st.alternatives, seed)
        exs = [Example(leakage.CANARY_INSTRUCTION, c.name, code) for code in [c.code, *alts]]
        lps = completion_logprobs(lm, exs)
        exposures.append(leakage.exposure(lps[0], lps[1:]))
    mem, non = base["members_ex"], base["non_ex"]
    fm, fn = completion_logprobs(lm, mem), completion_logprobs(lm, non)
    # Calibrated score: how much more likely the release finds the example than the base did.
    sm = [a - b for a, b in zip(fm, base["members"])]
    sn = [a - b for a, b in zip(fn, base["non"])]
    return {"exposure": exposures, "exposure_mean": sum(exposures) / len(exposures), "exposure_max_bits": math.log2(10 ** 6),
            "mia": {"auc": leakage.auc(sm, sn), "tpr_at_0.1%_fpr": leakage.tpr_at_fpr(sm, sn, 1e-3),
                    "auc_uncalibrated": leakage.auc(fm, fn), "members": len(sm), "non_members": len(sn)},
            "one_shot": one_shot(out, run["rows"], st, seed, canary_norm), "scored": scored}


def one_seed(st: Setup, seed: int, work: Path) -> dict[str, Any]:
    import random

    from fl_sim.models_cli import build_default

    data, canaries = data_with_canaries(st, seed)
    layout = write_layout(work, data)
    t0 = time.monotonic()
    models = build_default(work / "models", seed, st.pretrain, public=data.public, teacher_pretrain_steps=0)
    log.info("seed %d: models built in %.0f s", seed, time.monotonic() - t0)
    rng = random.Random(seed)
    pool = [e for s in data.shards for e in s if e.family != "canary"]
    members = rng.sample(pool, min(st.members, len(pool)))
    held = [e for f in sorted(data.heldout) for e in data.heldout[f]]
    non = rng.sample(held, min(st.members, len(held)))
    base = {"members_ex": members, "non_ex": non,
            "members": base_logprobs(models["student"], members), "non": base_logprobs(models["student"], non)}
    runs: dict[str, Any] = {}
    nodp = run_one(work, "no_dp", layout, models, st, seed, None)
    norm = mean_update_norm(Path(nodp["out"]))
    # The DP clip: about the size of one device's update in the no-DP run (the mean update's norm
    # there, times the devices: an upper estimate), so clipping itself costs little.
    clip = max(1e-3, norm * st.devices)
    runs["no_dp"] = {**nodp, "audit": audit(nodp, data, canaries, base, st, seed, norm)}
    for eps in st.epsilons:
        z = noise_for(eps, st.rounds)
        name = f"dp_eps{eps:g}"
        r = run_one(work, name, layout, models, st, seed, {"l2_clip": clip, "noise_multiplier": z, "delta": DELTA})
        r["noise_multiplier"], r["l2_clip"], r["target_epsilon"] = z, clip, eps
        runs[name] = {**r, "audit": audit(r, data, canaries, base, st, seed, clip)}
    for r in runs.values():
        r.pop("rows", None)
    return {"seed": seed, "runs": runs, "no_dp_mean_update_norm": norm}


def table(seeds: list[dict[str, Any]]) -> str:
    names = list(seeds[0]["runs"])
    lines = ["| run | rounds ok | accountant eps | one-shot eps | exposure (bits, mean / max of secrets) | MIA AUC | TPR@0.1%FPR | "
             "held-out EM | loss |",
             "|---|---|---|---|---|---|---|---|---|"]

    def avg(xs: list[float | None]) -> str:
        v = [x for x in xs if x is not None and math.isfinite(x)]
        inf = any(x is not None and not math.isfinite(x) for x in xs)
        return "inf" if inf and not v else (f"{sum(v) / len(v):.3g}" + (" (inf in some)" if inf else "")) if v else "-"

    for n in names:
        rs = [s["runs"][n] for s in seeds]
        lines.append(f"| {n} | {' / '.join(str(r['rounds_ok']) for r in rs)} | {avg([r['accountant_epsilon'] for r in rs])} | {avg([r['audit']['one_shot']['epsilon'] for r in rs])} | "
                     f"{avg([r['audit']['exposure_mean'] for r in rs])} / {max(max(r['audit']['exposure']) for r in rs):.3g} | "
                     f"{avg([r['audit']['mia']['auc'] for r in rs])} | {avg([r['audit']['mia']['tpr_at_0.1%_fpr'] for r in rs])} | "
                     f"{avg([r['exact_match'] for r in rs])} | {avg([r['loss'] for r in rs])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, no DP and eps 8, 2 rounds")
    ap.add_argument("--work", default=None, help="keep the runs here (default: a temporary directory)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    st = QUICK if a.quick else Setup()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="privacy_audit-") as tmp:
        root = Path(a.work) if a.work else Path(tmp)
        seeds = []
        for seed in st.seeds:
            seeds.append(one_seed(st, seed, root / f"seed{seed}"))
            log.info("seed %d done after %.0f s", seed, time.monotonic() - t0)
    res = {"benchmark": "privacy_audit", "quick": a.quick, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "setup": st.__dict__, "delta": DELTA, "seeds": seeds, "wall_s": round(time.monotonic() - t0, 1),
           "table": table(seeds)}
    path = ROOT / "benchmarks" / "results" / f"privacy_audit{'.quick' if a.quick else ''}.json"
    path.write_text(json.dumps(res, indent=2, default=str))
    sys.stdout.write(res["table"] + "\n")
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
