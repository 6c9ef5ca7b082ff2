"""The device's own settings (never sent by the aggregator)."""

from __future__ import annotations

from dataclasses import dataclass

from fl_lm.device import check_setting
from shared.config import load_file, require
from shared.secagg.floors import Floors
from shared.topics import check_device_id


@dataclass(frozen=True)
class EdgeConfig:
    device_id: str  # this device's id: its topics, its enrolment, its key files (1-64 of A-Z a-z 0-9 _ -)
    broker: str  # mqtt://HOST:PORT or mqtts://HOST:PORT
    data: str  # this device's private examples: JSONL (Alpaca, self-instruct, Dolly or chat records) or text
    student: str  # base model id or path, loaded with from_pretrained
    data_encoding: str | None = None  # of ``data`` when not UTF-8 (with or without a BOM)
    profile: str = "cpu-dev"  # firmware_profiles/NAME.toml, or a path to a profile file
    work_dir: str = "edge_state"  # the device's state: replay counters, residual, outbox, training checkpoint, ledger, releases
    protocol: str = "auto"  # MQTT version: auto (5, then 3.1.1), 5 or 3.1.1
    username: str | None = None  # the broker login, when not in a credentials file
    password: str | None = None  # the broker login's password (see allow_plaintext_password)
    ca_file: str | None = None  # CA certificate (PEM) that the broker's TLS certificate must chain to; unset: the system's
    # The broker login file fl-agg broker-config wrote for this client (username and password, 0600),
    # instead of username/password above; ca_file, when given, wins over the file's CA path.
    credentials: str | None = None
    # A password over plain mqtt:// to a host that is not this machine is refused unless this says so.
    allow_plaintext_password: bool = False
    # Security (on unless ``insecure``): this device's private keys (``fl-edge keygen``) and the
    # aggregator's public keys, pinned here rather than learnt from the network.
    keys: str | None = None
    aggregator_keys: str | None = None  # the aggregator's public keys (aggregator.pub.json)
    # Secure aggregation: the fleet authority's public key (pinned) and this device's certificate
    # (``fl-authority certify``). Without them the device declines secure rounds.
    authority_keys: str | None = None
    cert: str | None = None  # this device's certificate from fl-authority certify
    insecure: bool = False  # debug only: no keys, unsigned and unencrypted messages
    # The fleet this device belongs to: a release manifest signed for another fleet is refused.
    fleet: str = "default"
    releases_dir: str | None = None  # installed ONNX releases; default work_dir/releases
    chunk_bytes: int = 256 * 1024  # largest MQTT payload we send; bigger ones are chunked
    connect_timeout_s: float = 10.0  # one connect attempt's deadline
    # How long the first connect is retried (backoff 1 s doubling to 30 s, one line a failure)
    # before the process gives up: a broker started later, or a clock being set, is not fatal.
    connect_retry_s: float = 600.0
    idle_timeout_s: float = 0.0  # exit after this long without a message; 0 = never
    # Audit: keep a plaintext copy of each round's contribution under work_dir/sent/ (it never
    # leaves the device; an auditor compares it with what the aggregator could compute).
    keep_sent: bool = False
    # A resumable checkpoint of local training (plain rounds) at most this often, in seconds of
    # training; 0 = after every step. 30 s bounds what a crash loses to about 30 s of training and
    # keeps the writes rare: on Qwen2.5-0.5B with rank-16 LoRA on every linear layer each one is
    # about 140 MB (the fp32 adapter, its two AdamW moments, and the announcement with the global
    # adapter), too much for flash every few steps.
    checkpoint_every_s: float = 30.0
    # Where this device runs its student (fl_lm.device): auto (CUDA where torch sees a GPU, else
    # the CPU, with one warning line when the profile expects a GPU), cpu, cuda or cuda:N (refused
    # at start when absent). dtype: auto (bf16 autocast where the GPU has it, fp16 on older GPUs,
    # float32 on the CPU), or float32, bfloat16, float16; the planner counts the one used.
    device: str = "auto"
    dtype: str = "auto"
    # Secure-aggregation floors (shared.secagg.floors), held by the device because the aggregator
    # may lie: each one, when set, replaces the profile's. With an authority key (secure rounds
    # possible) a round without secure aggregation is refused too, unless ``allow_plain_rounds``:
    # in a plain round the aggregator sees this device's update (logged loudly at start).
    secagg_min_cohort: int | None = None
    secagg_min_threshold: float | None = None  # replaces the profile's secagg_min_threshold when set
    secagg_colluders: int | None = None  # replaces the profile's secagg_colluders when set
    allow_plain_rounds: bool = False
    # Distributed DP (edge_client.privacy), held by the device because the aggregator may lie:
    # refuse a round whose noise multiplier (its quorum's noise over this device's sensitivity) is
    # below dp_min_noise_multiplier, which also refuses rounds without DP; refuse a round that would
    # take this device's own epsilon at dp_delta past dp_max_epsilon. None: no such floor. The
    # epsilon is kept in work_dir/privacy.json either way.
    dp_min_noise_multiplier: float | None = None
    dp_max_epsilon: float | None = None
    dp_delta: float = 1e-5  # the usual "delta below 1/N" for fleets of up to ~1e5 devices

    def mqtt_login(self) -> tuple[str | None, str | None, str | None]:
        """(username, password, ca_file) for the broker, from ``credentials`` or the fields here."""
        from fl_mqtt.credentials import login

        return login(self.credentials or "", self.username, self.password, self.ca_file)

    def __post_init__(self) -> None:
        require(not (self.credentials and (self.username or self.password)),
                "give either credentials (the broker login file) or username/password, not both")
        try:
            check_device_id(self.device_id)
        except ValueError as e:
            require(False, f"device_id: {e}")
        require(self.protocol in ("auto", "5", "3.1.1"), f"protocol must be auto, 5 or 3.1.1, got {self.protocol!r}")
        if not self.insecure:
            require(self.keys is not None and self.aggregator_keys is not None,
                    "keys and aggregator_keys are required (run `fl-edge keygen`); set insecure = true only for debugging")
        require(4096 <= self.chunk_bytes <= 256 * 1024 * 1024, f"chunk_bytes must be in 4096..268435456, got {self.chunk_bytes}")
        require(self.connect_timeout_s > 0, f"connect_timeout_s must be > 0, got {self.connect_timeout_s}")
        require(self.connect_retry_s >= 0, f"connect_retry_s must be >= 0, got {self.connect_retry_s}")
        require(self.idle_timeout_s >= 0, f"idle_timeout_s must be >= 0, got {self.idle_timeout_s}")
        require(self.checkpoint_every_s >= 0, f"checkpoint_every_s must be >= 0, got {self.checkpoint_every_s}")
        check_setting(self.device, self.dtype)
        self.floors(Floors())  # validates the floors that are set
        require(self.dp_min_noise_multiplier is None or self.dp_min_noise_multiplier > 0,
                f"dp_min_noise_multiplier must be > 0 (or unset), got {self.dp_min_noise_multiplier}")
        require(self.dp_max_epsilon is None or self.dp_max_epsilon > 0, f"dp_max_epsilon must be > 0 (or unset), got {self.dp_max_epsilon}")
        require(0 < self.dp_delta < 1, f"dp_delta must be in (0, 1), got {self.dp_delta}")

    def floors(self, profile: Floors) -> Floors:
        """The profile's floors, with this config's where it sets them."""
        return Floors(profile.min_cohort if self.secagg_min_cohort is None else self.secagg_min_cohort,
                      profile.min_threshold if self.secagg_min_threshold is None else self.secagg_min_threshold,
                      profile.colluders if self.secagg_colluders is None else self.secagg_colluders)


def load(path: str) -> EdgeConfig:
    return load_file(EdgeConfig, path)
