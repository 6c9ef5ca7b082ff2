"""Device profiles: one file per device kind in ``firmware_profiles/`` with its training budget.

Device-local settings only; round settings come from the aggregator's ``RoundSpec``. Every field
here is enforced by the edge client (see ``edge_client.budget``), never merely displayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.config import from_dict, load_file, require
from shared.errors import ConfigError

PROFILE_DIR = Path(__file__).resolve().parent.parent / "firmware_profiles"


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    memory_gb: float  # unified memory of the module
    jetpack: str  # "" for non-Jetson boxes
    ort_providers: tuple[str, ...]  # onnxruntime execution providers, in preference order
    max_student_params: int  # refuse a base model larger than this
    max_lora_rank: int  # decline rounds asking for a larger rank
    batch_size: int
    max_seq_len: int  # longer examples are truncated
    max_steps_per_round: int  # local steps are capped at this, whatever the round asks
    torch_threads: int  # 0 = let torch decide

    def __post_init__(self) -> None:
        require(self.memory_gb > 0, f"memory_gb must be > 0, got {self.memory_gb}")
        require(self.max_student_params > 0, f"max_student_params must be > 0, got {self.max_student_params}")
        require(1 <= self.max_lora_rank <= 1024, f"max_lora_rank must be in 1..1024, got {self.max_lora_rank}")
        require(1 <= self.batch_size <= 4096, f"batch_size must be in 1..4096, got {self.batch_size}")
        require(16 <= self.max_seq_len <= 131072, f"max_seq_len must be in 16..131072, got {self.max_seq_len}")
        require(self.max_steps_per_round >= 1, f"max_steps_per_round must be >= 1, got {self.max_steps_per_round}")
        require(self.torch_threads >= 0, f"torch_threads must be >= 0, got {self.torch_threads}")
        require(bool(self.ort_providers), "ort_providers must not be empty")


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
