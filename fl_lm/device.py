"""One device policy for every model the system runs: where it runs, and at which precision.

``resolve`` turns a config's ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) and ``dtype``
(``auto``, ``float32``, ``bfloat16``, ``float16``) into a ``Placement``: the torch device, the
autocast dtype of the forward passes (None: plain float32) and the reason for both, for the log.
``auto`` puts a model on CUDA where torch sees a GPU, and autocasts it to bf16 where the GPU has
it natively (sm_80 and later), fp16 otherwise; on the CPU it stays float32, since bf16 and fp16
matmuls are many times slower there (../shared/docs/STACK.md).

Where a GPU is expected (a device profile with a compute capability) and torch sees none, the
model runs on the CPU after ONE warning line, never silently; ``cuda`` asked for explicitly and
absent is a ConfigError, in one line.

Trainable parameters (the LoRA adapters) stay float32 whatever the autocast dtype: autocast
casts per operation, so the optimizer updates float32 master weights. With fp16, whose range
gradients underflow, ``Stepper`` scales the loss (bf16 has float32's range and needs none).
Tensors built on the host (tokenized batches, arrays from the wire) go to the model's device
with ``Placement.put``; whatever goes back to numpy comes back with ``.cpu()``.

Importing this module does not import torch: configs validate their settings with
``check_setting`` and the planner reads ``expected`` without it.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from shared.errors import ConfigError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")  # and cuda:N
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
_ATTR = "fl_placement"  # where ``place`` records the placement on a model, for the loops that run it
_warned: set[str] = set()  # warnings already given by this process: each says its line once


def check_setting(device: str, dtype: str, where: str = "") -> None:
    """A config's ``device`` and ``dtype``, checked without torch: ConfigError naming the field."""
    pre = f"{where}." if where else ""
    if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device):
        raise ConfigError(f"{pre}device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"{pre}dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


@dataclass(frozen=True)
class Placement:
    """Where a model runs (``device``: "cpu" or "cuda:N") and the dtype its forward passes are
    autocast to (``autocast_dtype``: "bfloat16", "float16", or None for plain float32)."""

    device: str
    autocast_dtype: str | None
    reason: str

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def device_type(self) -> str:
        return "cuda" if self.is_cuda else "cpu"

    @property
    def compute_bytes(self) -> int:
        """Bytes per activation element (and per weight of a frozen base loaded for training)."""
        return 2 if self.autocast_dtype else 4

    @property
    def weights_dtype(self) -> str:
        """The dtype a device loads its frozen base in: the compute dtype, since its weights are
        never updated and a 2-byte copy halves their memory (what the planner counts)."""
        return self.autocast_dtype or "float32"

    def describe(self) -> str:
        return f"{self.device}, {f'{self.autocast_dtype} autocast' if self.autocast_dtype else 'float32'}"

    def autocast(self) -> Any:
        """The context forward passes run in: torch.autocast at the dtype, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device_type, dtype=getattr(torch, self.autocast_dtype))

    def put(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A batch's tensors on this device (other values as they are)."""
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}


CPU = Placement("cpu", None, "cpu")


def _bf16_native() -> bool:
    import torch

    try:
        # Without the flag torch also says yes where bf16 is only emulated (Volta, Turing): slow.
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # an older torch without the flag
        return bool(torch.cuda.is_bf16_supported())


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning("%s", msg)


def resolve(device: str = "auto", dtype: str = "auto", *, expect_gpu: str = "") -> Placement:
    """The placement a config's ``device`` and ``dtype`` give on this machine.

    ``expect_gpu``: who expects a GPU here (e.g. "profile orin-nano-8gb (sm_87)"), or "" when
    nobody does; with ``auto`` and no GPU it is the one warning line before the CPU run.
    """
    import torch

    check_setting(device, dtype)
    avail = bool(torch.cuda.is_available())
    if device == "cpu":
        dev, why = "cpu", "device = cpu"
    elif device.startswith("cuda"):
        if not avail:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(f"device = {device}: torch sees no CUDA GPU (torch {torch.__version__}, {build}); "
                              "set device = \"auto\" or \"cpu\" to run on the CPU")
        index = int(device.partition(":")[2] or 0)
        count = int(torch.cuda.device_count())
        if index >= count:
            raise ConfigError(f"device = {device}: torch sees {count} CUDA GPU{'s' if count != 1 else ''} "
                              f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
        dev, why = f"cuda:{index}", f"device = {device}"
    elif avail:
        dev, why = "cuda:0", "device = auto: torch sees a CUDA GPU"
    else:
        dev, why = "cpu", "device = auto: torch sees no CUDA GPU"
        if expect_gpu:
            hint = "" if torch.version.cuda else " (this torch is a CPU-only build)"
            _warn_once(f"{expect_gpu} expects a CUDA GPU but torch sees none{hint}: running on the CPU in float32, "
                       "far slower than planned")
    cuda = dev.startswith("cuda")
    if dtype == "auto":
        amp = (("bfloat16" if _bf16_native() else "float16") if cuda else None)
        why += f"; dtype = auto: {amp + ' autocast' if amp else 'float32'}"
        if cuda and amp == "float16":
            why += " (no native bf16 on this GPU)"
    elif dtype == "float32":
        amp, why = None, why + "; dtype = float32"
    else:
        if dtype == "bfloat16" and cuda and not _bf16_native():
            raise ConfigError("dtype = bfloat16: this GPU has no native bf16 (it needs compute capability 8.0 or "
                              "later); set dtype = \"float16\" or \"auto\"")
        amp, why = dtype, why + f"; dtype = {dtype}"
    return Placement(dev, amp, why)


def expected(compute_capability: str, dtype: str = "auto") -> Placement:
    """What ``resolve`` gives on the device a profile describes, without looking at this machine:
    the planner sizes a profile's training with it (``edge_client.planner``)."""
    check_setting("auto", dtype)
    if not compute_capability:
        return Placement("cpu", None if dtype in ("auto", "float32") else dtype, "profile without a CUDA GPU")
    major = int(compute_capability.split(".")[0])
    amp = {"auto": "bfloat16" if major >= 8 else "float16", "float32": None}.get(dtype, dtype)
    return Placement("cuda:0", amp, f"profile's GPU, sm_{compute_capability.replace('.', '')}")


def place(model: Any, placement: Placement) -> Any:
    """Move ``model`` to the placement's device and record the placement on it, so the loops
    that run it (``of_model``) autocast as the config said; returns the model."""
    model = model.to(placement.device)
    object.__setattr__(model, _ATTR, placement)  # a plain attribute, not a submodule or buffer
    return model


def of_model(model: Any) -> Placement:
    """The placement ``place`` recorded (PEFT wrappers find it on their base model), or, for a
    model placed some other way, its parameters' device with ``auto``'s dtype there (the CPU for
    a callable without parameters: anything returning ``.logits`` may stand in for a model)."""
    import torch

    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    dev = p.device if p is not None else torch.device("cpu")
    pl = getattr(model, _ATTR, None)
    if isinstance(pl, Placement) and torch.device(pl.device) == dev:
        return pl
    if dev.type == "cuda":
        return Placement(f"cuda:{dev.index or 0}", "bfloat16" if _bf16_native() else "float16", "the model's device")
    return CPU


class Stepper:
    """backward, gradient-norm clip and optimizer step; with fp16 autocast the loss is scaled
    (torch.amp.GradScaler) so small gradients do not flush to zero, and a step whose gradients
    overflowed is skipped. The caller zeroes the gradients, where its loop always has."""

    def __init__(self, placement: Placement, params: list[Any], optimizer: Any, max_norm: float = 1.0) -> None:
        import torch

        self.params, self.opt, self.max_norm = params, optimizer, max_norm
        fp16 = placement.autocast_dtype == "float16"
        self.scaler = torch.amp.GradScaler(placement.device_type) if fp16 else None

    def __call__(self, loss: Any) -> None:
        import torch

        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
            self.opt.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
