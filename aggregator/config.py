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
    devices: tuple[str, ...] = ()  # insecure mode: the allowed device ids; secure mode: from the registry
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
    # Security (on unless ``insecure``): the aggregator's private keys (``fl-agg keygen``) and the
    # registry of enrolled devices' public keys (``fl-agg enroll``). Only enrolled devices count.
    keys: str | None = None
    registry: str | None = None
    insecure: bool = False
    chunk_bytes: int = 256 * 1024  # largest MQTT payload we send; bigger ones are chunked
    # Debug/audit only: keep every received update's raw bytes under out_dir/received/. With
    # secure aggregation off these are individual plaintext updates, so it is off by default.
    keep_received: bool = False
    # Secure aggregation (``shared.secagg``): on by default; the aggregator then learns only the
    # sum of the updates. Off only for debugging or for per-device top-k.
    secagg: bool = True
    secagg_threshold: int = 0  # t of the Shamir sharing; 0: 2/3 of each neighbourhood (>= 2)
    clip: float = 0.05  # per-coordinate clip of a sent value; what is clipped stays in the residual
    # Resolution of each sent value (stochastic rounding keeps it unbiased). The masked ring gets
    # ceil(log2(n)) more bits so the sum of n devices cannot wrap; the ring is what goes on the wire.
    # 0: the finest resolution a 32-bit ring allows for the round's cohort.
    value_bits: int = 0
    key_timeout_s: float = 60.0  # deadline of each key-exchange and unmask stage
    # Sparse updates on a round-shared index set (FLASC-style), with error feedback on devices.
    density: float = 1.0  # fraction of adapter coordinates sent per round; 1.0 = dense
    # random (seeded random-k: measured best, benchmarks/README.md), topk (global: from the masked
    # magnitude sketch with secagg, momentum of aggregates without), device_topk (secagg off only)
    sparse_method: str = "random"
    topk_beta: float = 0.9  # momentum of the aggregate's magnitudes that rank coordinates
    topk_explore: float = 0.25  # share of k drawn at random outside the top, so no coordinate starves
    sparse_value_dtype: str = "float32"  # values without secure aggregation: float32 or float16
    # Secure top-k: devices add a masked per-block magnitude sketch (one value per this many
    # coordinates) so the next round's index set follows the fleet's unsent mass; 0 = momentum only.
    sketch_block: int = 64

    def __post_init__(self) -> None:
        require(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        if self.insecure:
            require(bool(self.devices), "devices must list at least one device id when insecure = true")
        else:
            require(self.keys is not None and self.registry is not None,
                    "keys and registry are required (fl-agg keygen / fl-agg enroll); set insecure = true only for debugging")
        require(4096 <= self.chunk_bytes <= 256 * 1024 * 1024, f"chunk_bytes must be in 4096..268435456, got {self.chunk_bytes}")
        for d in self.devices:
            try:
                check_device_id(d)
            except ValueError as e:
                require(False, f"devices: {e}")
        require(len(set(self.devices)) == len(self.devices), "devices has duplicates")
        require(self.clients_per_round >= 0, f"clients_per_round must be >= 0, got {self.clients_per_round}")
        require(self.quorum >= 1 and (not self.devices or self.quorum <= len(self.devices)),
                f"quorum must be in 1..{len(self.devices) or 'n'}, got {self.quorum}")
        require(self.min_devices_to_start >= self.quorum, f"min_devices_to_start ({self.min_devices_to_start}) must be >= quorum ({self.quorum})")
        require(self.round_timeout_s > 0 and self.wait_for_devices_s > 0, "timeouts must be > 0")
        require(self.local_steps >= 1, f"local_steps must be >= 1, got {self.local_steps}")
        require(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        require(self.server_lr > 0, f"server_lr must be > 0, got {self.server_lr}")
        require(self.eval_max_per_family >= 1, "eval_max_per_family must be >= 1")
        require(0.0 < self.density <= 1.0, f"density must be in (0, 1], got {self.density}")
        require(self.sparse_method in ("topk", "random", "device_topk"),
                f"sparse_method must be topk, random or device_topk, got {self.sparse_method!r}")
        require(not (self.secagg and self.sparse_method == "device_topk"),
                "sparse_method = device_topk needs secagg = false: pairwise masks cancel only on coordinates every device sends")
        require(self.sparse_value_dtype in ("float32", "float16"), f"sparse_value_dtype must be float32 or float16, got {self.sparse_value_dtype!r}")
        require(0.0 <= self.topk_beta < 1.0 and 0.0 <= self.topk_explore <= 1.0, "topk_beta must be in [0, 1), topk_explore in [0, 1]")
        require(self.clip > 0, f"clip must be > 0, got {self.clip}")
        require(self.sketch_block >= 0, f"sketch_block must be >= 0, got {self.sketch_block}")
        require(0 <= self.value_bits <= 31, f"value_bits must be in 0..31 (0 = finest), got {self.value_bits}")
        require(self.secagg_threshold == 0 or self.secagg_threshold >= 2, "secagg_threshold must be 0 (auto) or >= 2")
        require(self.key_timeout_s > 0, "key_timeout_s must be > 0")
        require(self.protocol in ("auto", "5", "3.1.1"), f"protocol must be auto, 5 or 3.1.1, got {self.protocol!r}")


def load(path: str) -> AggregatorConfig:
    return load_file(AggregatorConfig, path)
