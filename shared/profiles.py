"""Device profiles: one file per device kind in ``firmware_profiles/`` with its training budget.

Device-local settings only; round settings come from the aggregator's ``RoundSpec``. Every field
here is enforced by the edge client (see ``edge_client.budget``), never merely displayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.config import from_dict, load_file, require
from shared.errors import ConfigError
from shared.secagg.floors import Floors

PROFILE_DIR = Path(__file__).resolve().parent.parent / "firmware_profiles"


@dataclass(frozen=True)
class DeviceProfile:
    """One device kind: its hardware, and the budget local training must stay within.

    Each value's source is in ``firmware_profiles/README.md``. What reads each field:
    ``memory_gb`` x ``memory_fraction`` is the memory planner's budget (``edge_client.planner``);
    ``compute_capability`` sets the planner's weight/activation dtype and is checked against the
    GPU torch sees, as are ``cuda``, ``jetpack`` and ``power_mode`` (``edge_client.environment``);
    ``ort_providers`` order onnxruntime's execution providers for the release; ``quant_bits`` and
    ``gradient_checkpointing`` shape the training the planner sizes; the rest cap what a round
    may ask (``edge_client.budget``). There is no parameter cap: whether a profile can train a
    student is decided by the memory planner from the student's shape.
    """

    name: str  # the profile's name (its file is firmware_profiles/NAME.toml)
    description: str  # the device, for people: module, memory, software
    # -- hardware --------------------------------------------------------------------------------
    memory_gb: float  # memory of the module (unified on Jetson: CPU and GPU share it)
    compute_capability: str  # CUDA sm version as "8.7"; "" for a box without a CUDA GPU
    jetpack: str  # JetPack release the profile was made for; "" for non-Jetson boxes
    cuda: str  # CUDA version of that JetPack ("12.6"); "" without CUDA
    power_mode: str  # the nvpmodel mode the budget assumes ("25W", "MAXN"); "" where there is none
    ort_providers: tuple[str, ...]  # onnxruntime execution providers, in preference order
    # -- training budget -------------------------------------------------------------------------
    memory_fraction: float  # share of memory_gb local training may use (the rest: OS, desktop, runtime)
    max_lora_rank: int  # decline rounds asking for a larger rank
    batch_size: int  # largest micro-batch; the planner may choose a smaller one
    max_seq_len: int  # longest training sequence; the planner may choose a shorter one
    quant_bits: int  # the frozen base's weights: 4 or 8 (HQQ, fl_lm.quantized) or 16 (as loaded)
    gradient_checkpointing: bool  # allowed when activations would not fit otherwise
    max_steps_per_round: int  # local steps are capped at this, whatever the round asks
    torch_threads: int  # 0 = let torch decide
    # -- secure-aggregation floors (shared.secagg.floors): this device's own, whatever the
    # aggregator's round spec says; the device config can only make them stricter ------------------
    secagg_min_cohort: int = 3  # fewest participants in a round, and survivors it signs for
    secagg_min_threshold: float = 2 / 3  # t >= ceil(this * k), k the neighbourhood size
    secagg_colluders: int = 0  # colluders c it wants tolerated in its neighbourhood: t > (k + c) / 2

    def __post_init__(self) -> None:
        require(self.memory_gb > 0, f"memory_gb must be > 0, got {self.memory_gb}")
        require(0.05 <= self.memory_fraction <= 1.0, f"memory_fraction must be in 0.05..1, got {self.memory_fraction}")
        require(self.compute_capability == "" or _is_version(self.compute_capability, 2),
                f"compute_capability must be like \"8.7\" or empty, got {self.compute_capability!r}")
        require(self.cuda == "" or _is_version(self.cuda, 2), f"cuda must be like \"12.6\" or empty, got {self.cuda!r}")
        require(self.jetpack == "" or _is_version(self.jetpack, 3), f"jetpack must be like \"6.2\" or empty, got {self.jetpack!r}")
        require(bool(self.compute_capability) == bool(self.cuda), "compute_capability and cuda go together (both or neither)")
        require(1 <= self.max_lora_rank <= 1024, f"max_lora_rank must be in 1..1024, got {self.max_lora_rank}")
        require(1 <= self.batch_size <= 4096, f"batch_size must be in 1..4096, got {self.batch_size}")
        require(16 <= self.max_seq_len <= 131072, f"max_seq_len must be in 16..131072, got {self.max_seq_len}")
        require(self.quant_bits in (4, 8, 16), f"quant_bits must be 4, 8 or 16, got {self.quant_bits}")
        require(self.max_steps_per_round >= 1, f"max_steps_per_round must be >= 1, got {self.max_steps_per_round}")
        require(self.torch_threads >= 0, f"torch_threads must be >= 0, got {self.torch_threads}")
        self.secagg_floors()  # validates the three floors
        require(bool(self.ort_providers), "ort_providers must not be empty")
        require(self.ort_providers[-1] == "CPUExecutionProvider", "ort_providers must end with CPUExecutionProvider (the fallback)")

    def secagg_floors(self) -> Floors:
        return Floors(self.secagg_min_cohort, self.secagg_min_threshold, self.secagg_colluders)

    @property
    def budget_bytes(self) -> int:
        return int(self.memory_gb * self.memory_fraction * (1 << 30))


def _is_version(v: str, parts: int) -> bool:
    bits = v.split(".")
    return 1 <= len(bits) <= parts and all(b.isdigit() for b in bits)


def load_profile(name_or_path: str) -> DeviceProfile:
    """Load ``firmware_profiles/NAME.toml`` by name, or any profile file by path."""
    p = Path(name_or_path)
    if p.suffix != ".toml":
        p = PROFILE_DIR / f"{name_or_path}.toml"
    if not p.exists():
        known = sorted(x.stem for x in PROFILE_DIR.glob("*.toml"))
        raise ConfigError(f"device profile {name_or_path!r} not found; known profiles: {known}")
    return load_file(DeviceProfile, p)


def list_profiles() -> list[str]:
    return sorted(x.stem for x in PROFILE_DIR.glob("*.toml"))


__all__ = ["DeviceProfile", "load_profile", "list_profiles", "from_dict"]
