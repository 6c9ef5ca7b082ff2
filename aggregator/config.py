"""Aggregator settings, from a JSON or TOML file; unknown keys are errors."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.config import load_file, require
from shared.topics import check_device_id


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # All linear layers of a Llama/Qwen2 block; the LM head stays frozen.
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __post_init__(self) -> None:
        require(1 <= self.r <= 1024, f"lora.r must be in 1..1024, got {self.r}")
        require(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        require(bool(self.target_modules), "lora.target_modules must not be empty")


@dataclass(frozen=True)
class AggregatorConfig:
    broker: str  # mqtt://HOST:PORT or mqtts://HOST:PORT
    student: str  # student base id or path (from_pretrained)
    eval_data: str  # held-out examples: a JSONL/text file or a directory of them (one family per file)
    out_dir: str  # metrics.jsonl, checkpoints/, state.json
    devices: tuple[str, ...]  # enrolled device ids; anything else is ignored with a log line
    rounds: int = 5
    clients_per_round: int = 0  # 0 = every online device
    quorum: int = 1  # fewest updates for a round to count; fewer and it is abandoned
    min_devices_to_start: int = 1  # wait for this many online devices before a round
    wait_for_devices_s: float = 120.0
    round_timeout_s: float = 300.0  # deadline for updates once a round is announced
    local_steps: int = 20
    learning_rate: float = 3e-3
    server_lr: float = 1.0  # FedAvg: global += server_lr * weighted mean delta
    lora: LoraSettings = field(default_factory=LoraSettings)
    seed: int = 0
    eval_max_per_family: int = 50
    eval_batch_size: int = 32
    max_seq_len: int = 128
    protocol: str = "auto"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    torch_threads: int = 0
    # Debug/audit only: keep every received update's raw bytes under out_dir/received/. With
    # secure aggregation off these are individual plaintext updates, so it is off by default.
    keep_received: bool = False

    def __post_init__(self) -> None:
        require(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        require(bool(self.devices), "devices must list at least one enrolled device id")
        for d in self.devices:
            try:
                check_device_id(d)
            except ValueError as e:
                require(False, f"devices: {e}")
        require(len(set(self.devices)) == len(self.devices), "devices has duplicates")
        require(self.clients_per_round >= 0, f"clients_per_round must be >= 0, got {self.clients_per_round}")
        require(1 <= self.quorum <= len(self.devices), f"quorum must be in 1..{len(self.devices)}, got {self.quorum}")
        require(self.min_devices_to_start >= self.quorum, f"min_devices_to_start ({self.min_devices_to_start}) must be >= quorum ({self.quorum})")
        require(self.round_timeout_s > 0 and self.wait_for_devices_s > 0, "timeouts must be > 0")
        require(self.local_steps >= 1, f"local_steps must be >= 1, got {self.local_steps}")
        require(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        require(self.server_lr > 0, f"server_lr must be > 0, got {self.server_lr}")
        require(self.eval_max_per_family >= 1, "eval_max_per_family must be >= 1")
        require(self.protocol in ("auto", "5", "3.1.1"), f"protocol must be auto, 5 or 3.1.1, got {self.protocol!r}")


def load(path: str) -> AggregatorConfig:
    return load_file(AggregatorConfig, path)
