"""The memory planner (issue 13): the peak memory of a local-training configuration, predicted
from the model's config alone, and the largest configuration within a device profile's budget.

Nothing is allocated: the model is built on torch's ``meta`` device to read its layer shapes.
The peak is the sum of:
- the runtime (interpreter, torch, transformers, peft; a CUDA context on a GPU);
- the frozen base's weights (quantized linear layers at ``bits`` plus HQQ's per-group scale
  and zero, the rest at the load dtype) and one linear layer dequantized at a time;
- the LoRA adapters with their gradients and AdamW's two moments (4 x fp32 per parameter);
- the activations backward needs: per layer and token, the block's intermediate tensors and
  the attention probabilities (heads x sequence), or, with gradient checkpointing, only each
  layer's input plus one layer recomputed;
- the logits and the loss's float32 copies (tokens x vocabulary);
- for generation (scoring rollouts, serving), the KV cache instead of the training terms.
Weights and activations count at the dtype the device policy (``fl_lm.device``) runs them at:
2 bytes under bf16/fp16 autocast on a GPU (the frozen base is loaded at that dtype), 4 in
float32 on a CPU. There is no parameter cap beside this: whether a device can train a student
is what the plan says.
The activation and logit terms carry two fitted factors (``ACT_OVERHEAD``, ``LOGIT_F32_COPIES``):
``benchmarks/edge_train.py`` measured the RSS high-water mark and its results say how close the
prediction is on configurations the fit did not use.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from fl_lm import device
from shared.errors import ConfigError
from shared.messages import LoraSpec
from shared.profiles import DeviceProfile

log = logging.getLogger(__name__)

MB = 1 << 20
GB = 1 << 30
# The process before the model: python, torch, transformers, peft, tokenizers, paho, our code
# (RSS measured here at import, benchmarks/edge_train.py). A CUDA context on Jetson adds about this.
RUNTIME_CPU = 520 * MB
CUDA_CONTEXT = 800 * MB
GROUP = 64  # HQQ group size (fl_lm.quantized)
# Stored activations per token and layer, in units of hidden size, of a Llama/Qwen block in
# training (norm in and out, q k v, rotary copies, attention out, o_proj, residuals, MLP gate,
# up, activation, product, down), and how many heads x sequence attention tensors are kept.
ACT_HIDDEN = 10
ACT_KV = 3
ACT_INTERMEDIATE = 4
ACT_ATTENTION = 2
# What autograd keeps beyond those block outputs (norm, rotary and SiLU internals, LoRA's inputs,
# the backward's gradients of the layer in flight), as a factor on them. Fitted, with the logit
# copies below, on the two unquantized Qwen2.5-0.5B-shape runs of benchmarks/edge_train.py (with
# and without checkpointing, glibc's mmap threshold fixed as ``fl-edge run`` sets it: the
# allocator then returns freed blocks, which it did not in the first fit, 1.675 and 6.5); the
# three quantized runs and the demo student's check the fit.
ACT_OVERHEAD = 1.05
# Logits and the loss: the logits at the compute dtype plus float32 tensors of tokens x vocabulary
# (the upcast, log-softmax, their gradients): 2.9 of them, fitted as above. The fit sees runtime
# plus logits together: the benchmark's bare process measures about 400 MB before the model, the
# edge client's imports about 520 (RUNTIME_CPU), so this factor is the one that absorbs it.
LOGIT_F32_COPIES = 2.9


# What a base must leave room for at the least: rank 1 on one projection (edge_client.client.load_model).
SMALLEST_LORA = LoraSpec(r=1, alpha=1.0, dropout=0.0, target_modules=("q_proj",))


class PlanError(ConfigError):
    """No configuration fits: the message names the budget and what takes it."""


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # key/value width: kv heads x head dim
    vocab: int
    linear_params: int  # in nn.Linear layers a quantized base quantizes (the LM head excepted)
    other_params: int  # embeddings, norms, an untied LM head: kept at the load dtype
    largest_linear: int  # parameters of the biggest quantized linear layer (dequantized one at a time)
    # (leaf module name, in features, out features, kind) of every adaptable module
    modules: tuple[tuple[str, int, int, str], ...]

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, spec: LoraSpec) -> int:
        return sum(spec.r * (i + o) for name, i, o, _ in self.modules if name in spec.target_modules)


def shape_of(id_or_path: str) -> ModelShape:
    """The shape of a causal LM from its config, without loading or allocating its weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(id_or_path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {id_or_path}: cannot read its config ({str(e).splitlines()[0]})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return shape_of_model(model, cfg)


def shape_of_model(model: Any, cfg: Any) -> ModelShape:
    import torch

    lin = other = largest = 0
    mods: list[tuple[str, int, int, str]] = []
    seen: set[int] = set()
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, torch.nn.Linear):
            mods.append((leaf, m.in_features, m.out_features, "linear"))
        elif isinstance(m, torch.nn.Embedding):
            mods.append((leaf, m.num_embeddings, m.embedding_dim, "embedding"))
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # tied weights count once
            seen.add(id(p))
            if isinstance(m, torch.nn.Linear) and leaf != "lm_head" and pname == "weight":
                lin += p.numel()
                largest = max(largest, p.numel())
            else:
                other += p.numel()
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return ModelShape(layers=int(cfg.num_hidden_layers), hidden=int(cfg.hidden_size), intermediate=int(cfg.intermediate_size),
                      heads=heads, kv_dim=int(getattr(cfg, "num_key_value_heads", heads)) * head_dim, vocab=int(cfg.vocab_size),
                      linear_params=lin, other_params=other, largest_linear=largest, modules=tuple(mods))


@dataclass(frozen=True)
class Setting:
    batch: int
    seq: int
    bits: int  # 4, 8 (HQQ) or 16 (the load dtype)
    checkpointing: bool


def predict(shape: ModelShape, s: Setting, lora: LoraSpec, *, cuda: bool, compute_bytes: int | None = None) -> dict[str, int]:
    """Bytes of each part of the peak, and ``peak`` (training or generation, whichever is larger).

    ``compute_bytes``: of the frozen base's weights and of the activations, as the device policy
    runs them (``fl_lm.device.Placement.compute_bytes``: 2 under bf16/fp16 autocast, 4 in float32);
    by default what ``auto`` gives: 2 on a GPU, 4 on the CPU.
    """
    wb = compute_bytes or (2 if cuda else 4)
    tokens = s.batch * s.seq
    meta = 2 * wb / GROUP  # scale and zero per group
    qbytes = {16: wb, 8: 1 + meta, 4: 0.5 + meta}[s.bits]
    h, kv, inter = shape.hidden, shape.kv_dim, shape.intermediate
    per_token_layer = wb * (ACT_HIDDEN * h + ACT_KV * kv + ACT_INTERMEDIATE * inter + ACT_ATTENTION * shape.heads * s.seq)
    if s.checkpointing:
        acts = ACT_OVERHEAD * (shape.layers * tokens * h * wb + tokens * per_token_layer)
    else:
        acts = ACT_OVERHEAD * shape.layers * tokens * per_token_layer
    out = {
        "runtime": RUNTIME_CPU + (CUDA_CONTEXT if cuda else 0),
        "weights": int(shape.linear_params * qbytes + shape.other_params * wb),
        "dequantized_layer": shape.largest_linear * wb if s.bits < 16 else 0,
        "adapters_grads_optimizer": shape.lora_params(lora) * 16,
        "activations": int(acts),
        "logits_and_loss": int(tokens * shape.vocab * (wb + 4 * LOGIT_F32_COPIES)),
        "kv_cache_generate": 2 * shape.layers * kv * s.seq * s.batch * wb,
    }
    train = sum(v for k, v in out.items() if k != "kv_cache_generate")
    generate = out["runtime"] + out["weights"] + out["dequantized_layer"] + out["kv_cache_generate"] + s.batch * shape.vocab * 4
    out["peak"] = max(train, generate)
    return out


@dataclass(frozen=True)
class Plan:
    profile: str
    budget: int
    setting: Setting
    lora: LoraSpec
    predicted: dict[str, int]
    placement: device.Placement = device.CPU  # where and at which dtype the plan assumes training runs

    def to_json(self) -> dict[str, Any]:
        return {"profile": self.profile, "budget_bytes": self.budget, "fits": self.predicted["peak"] <= self.budget,
                **dataclasses.asdict(self.setting), "lora_rank": self.lora.r, "lora_targets": list(self.lora.target_modules),
                "device": self.placement.device, "compute_dtype": self.placement.autocast_dtype or "float32",
                "predicted_bytes": self.predicted}

    def text(self) -> str:
        s, p = self.setting, self.predicted
        lines = [f"profile {self.profile}: budget {self.budget / GB:.2f} GB",
                 f"plan: batch {s.batch} x seq {s.seq}, base {('%d-bit HQQ' % s.bits) if s.bits < 16 else 'unquantized'}, "
                 f"gradient checkpointing {'on' if s.checkpointing else 'off'}, LoRA r {self.lora.r} on "
                 f"{', '.join(self.lora.target_modules)}",
                 f"compute: {self.placement.describe()} ({self.placement.reason})",
                 f"predicted peak {p['peak'] / GB:.2f} GB ({100 * p['peak'] / self.budget:.0f}% of the budget):"]
        lines += [f"  {k:26s} {v / MB:10.1f} MB" for k, v in p.items() if k != "peak"]
        return "\n".join(lines)


def _settings(profile: DeviceProfile) -> list[Setting]:
    """Candidates, largest first: tokens per step (batch x seq), then no checkpointing before it."""
    batches = sorted({max(1, profile.batch_size >> i) for i in range(12)}, reverse=True)
    seqs = sorted({max(32, profile.max_seq_len >> i) for i in range(12)} | {profile.max_seq_len}, reverse=True)
    ckpt = [False, True] if profile.gradient_checkpointing else [False]
    cands = [Setting(b, s, profile.quant_bits, c) for b in batches for s in seqs if s <= profile.max_seq_len for c in ckpt]
    return sorted(cands, key=lambda x: (-(x.batch * x.seq), -x.seq, x.checkpointing))


def plan(profile: DeviceProfile, shape: ModelShape, lora: LoraSpec, placement: device.Placement | None = None) -> Plan:
    """The largest setting whose predicted peak fits the profile's budget, or PlanError.

    ``placement``: where training actually runs (``fl_lm.device.resolve`` on the device), so the
    dtype counted is the one used; by default the profile's own hardware (``device.expected``):
    bf16 or fp16 on its GPU, float32 on a CPU profile.
    """
    pl = placement or device.expected(profile.compute_capability)
    cuda, wb = pl.is_cuda, pl.compute_bytes
    budget = profile.budget_bytes
    cands = _settings(profile)
    for s in cands:
        pred = predict(shape, s, lora, cuda=cuda, compute_bytes=wb)
        if pred["peak"] <= budget:
            return Plan(profile.name, budget, s, lora, pred, pl)
    smallest = min(cands, key=lambda x: (x.batch * x.seq, not x.checkpointing))
    pred = predict(shape, smallest, lora, cuda=cuda, compute_bytes=wb)
    parts = ", ".join(f"{k} {v / GB:.2f} GB" for k, v in sorted(pred.items(), key=lambda kv: -kv[1]) if k != "peak" and v)
    raise PlanError(f"does not fit profile {profile.name}: even batch {smallest.batch} x seq {smallest.seq}"
                    f"{' with gradient checkpointing' if smallest.checkpointing else ''} needs {pred['peak'] / GB:.2f} GB "
                    f"of the {budget / GB:.2f} GB budget ({parts}; on {pl.describe()})")
