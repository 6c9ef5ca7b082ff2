"""The device's own settings (never sent by the aggregator)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import load_file, require
from shared.topics import check_device_id


@dataclass(frozen=True)
class EdgeConfig:
    device_id: str
    broker: str  # mqtt://HOST:PORT or mqtts://HOST:PORT
    data: str  # this device's private examples: Alpaca JSONL or text file
    student: str  # base model id or path, loaded with from_pretrained
    profile: str = "cpu-dev"  # firmware_profiles/NAME.toml, or a path to a profile file
    work_dir: str = "edge_state"
    protocol: str = "auto"  # MQTT version: auto (5, then 3.1.1), 5 or 3.1.1
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 0.0  # exit after this long without a message; 0 = never

    def __post_init__(self) -> None:
        try:
            check_device_id(self.device_id)
        except ValueError as e:
            require(False, f"device_id: {e}")
        require(self.protocol in ("auto", "5", "3.1.1"), f"protocol must be auto, 5 or 3.1.1, got {self.protocol!r}")
        require(self.connect_timeout_s > 0, f"connect_timeout_s must be > 0, got {self.connect_timeout_s}")
        require(self.idle_timeout_s >= 0, f"idle_timeout_s must be >= 0, got {self.idle_timeout_s}")


def load(path: str) -> EdgeConfig:
    return load_file(EdgeConfig, path)
