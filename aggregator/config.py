"""Aggregator settings, from a JSON or TOML file; unknown keys are errors."""

from __future__ import annotations

from dataclasses import dataclass, field

from aggregator.modes import REGISTRY as MODES
from fl_lm.device import check_setting
from shared.config import load_file, require
from shared.topics import check_device_id


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA adapter's shape: the student's (``lora``, sent to the devices in every round spec) or the
    teacher's (``teacher_lora``, on the aggregator only)."""

    r: int = 8  # rank of the low-rank update
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input while training
    # All linear layers of a Llama/Qwen2 block; the LM head stays frozen.
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __post_init__(self) -> None:
        require(1 <= self.r <= 1024, f"lora.r must be in 1..1024, got {self.r}")
        require(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        require(bool(self.target_modules), "lora.target_modules must not be empty")


KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class DistilSettings:
    """Mutual distillation on the aggregator's public set (``mode = "fedkd"``)."""

    loss: str = "forward_kl"  # forward_kl, reverse_kl or jsd (TRL's generalized JSD, with beta)
    beta: float = 0.5  # jsd only
    temperature: float = 1.0  # softmax temperature of both distributions in the KD loss
    top_k: int = 32  # teacher distribution truncated to its top k, the rest one bucket; 0 = full vocabulary
    # FedMKT's kd_alpha: weight of the LM loss on the public references (the KD term gets 1 - kd_alpha).
    # FedMKT uses 0.9; our public set is small and exact-answer, so the KD term carries more.
    kd_alpha: float = 0.5
    # DualMinCE: per sample, the KD target comes from the side with the lower cross-entropy on the
    # reference: the other model's, or the learner's own as the phase found it (an anchor).
    selective: bool = True
    balance_families: bool = True  # draw the public set's families equally often
    batch_size: int = 16  # public examples per distillation step
    student_steps: int = 20  # teacher -> student steps per round
    student_lr: float = 5e-4  # half the devices' rate: more moves the student off what the fleet taught it
    teacher_steps: int = 20  # student -> teacher steps per round
    teacher_lr: float = 2.5e-4  # more, and the teacher forgets public families while learning the fleet's

    def __post_init__(self) -> None:
        require(self.loss in KD_LOSSES, f"distil.loss must be one of {KD_LOSSES}, got {self.loss!r}")
        require(self.loss != "jsd" or 0.0 < self.beta < 1.0, f"distil.beta must be in (0, 1) for jsd, got {self.beta}")
        require(self.temperature > 0, f"distil.temperature must be > 0, got {self.temperature}")
        require(self.top_k >= 0, f"distil.top_k must be >= 0 (0 = full vocabulary), got {self.top_k}")
        require(0.0 <= self.kd_alpha <= 1.0, f"distil.kd_alpha must be in [0, 1], got {self.kd_alpha}")
        require(self.batch_size >= 1, f"distil.batch_size must be >= 1, got {self.batch_size}")
        require(self.student_steps >= 0 and self.teacher_steps >= 0, "distil.student_steps and teacher_steps must be >= 0")
        require(self.student_lr > 0 and self.teacher_lr > 0, "distil.student_lr and teacher_lr must be > 0")


MINILLM_ROLES = ("client", "server")


@dataclass(frozen=True)
class ReleaseConfig:
    """The ONNX release of the global student (aggregator.release): when, how, and for which fleet."""

    enabled: bool = True  # build, sign and send releases at all
    every: int = 0  # also release every N rounds; 0: only after the last round
    only_if_improved: bool = False  # skip a scheduled release unless held-out loss beat the last release's
    int8: bool = False  # dynamic int8 weights (at least 3x smaller; parity bounds in fl_lm.onnx_parity)
    keep: int = 3  # releases kept on disk for a signed rollback
    fleet: str = "default"  # devices refuse a manifest for another fleet

    def __post_init__(self) -> None:
        require(self.every >= 0, f"release.every must be >= 0, got {self.every}")
        require(self.keep >= 1, f"release.keep must be >= 1, got {self.keep}")
        require(bool(self.fleet), "release.fleet must not be empty")


@dataclass(frozen=True)
class MiniLLMConfig:
    """Sequence-level distillation with alternating roles (``mode = "fl-minillm"``).

    A *client* round: the fleet teaches the aggregator's teacher. It samples continuations of
    public prompts, the devices score them with their locally trained students, and only the
    fleet's mean distribution (through secure aggregation) reaches the aggregator, which distils it
    into the teacher with the MiniLLM objective. A *server* round: the teacher teaches the global
    student (MiniLLM, teacher-mixed sampling), which is then the next round's global model.
    """

    roles: tuple[str, ...] = ("client", "server")  # cycled over the rounds, round 1 first
    prompts: int = 16  # public prompts per round, all of one token length
    max_new_tokens: int = 12  # tokens sampled per rollout (the continuation's length)
    candidates: int = 8  # K: the teacher's top-k per position that the fleet scores (plus the rest)
    steps: int = 6  # MiniLLM updates per round on the aggregator (server rounds: rollout batches)
    student_lr: float = 2e-4  # the student's learning rate in server rounds
    teacher_lr: float = 1e-4  # the teacher's learning rate in client rounds
    alpha: float = 0.2  # teacher-mixed sampling in server rounds
    gamma: float = 0.95  # discount of the per-token reward in MiniLLM's policy gradient
    clip: float = 0.2  # PPO's clip on the importance ratio
    ppo_epochs: int = 2  # passes over each batch of rollouts
    lm_coef: float = 0.5  # LM loss on the public references beside the reverse KL (MiniLLM's L_PT)

    def __post_init__(self) -> None:
        require(bool(self.roles) and all(r in MINILLM_ROLES for r in self.roles),
                f"minillm.roles must be a non-empty list of {MINILLM_ROLES}, got {self.roles!r}")
        require(self.prompts >= 1 and self.max_new_tokens >= 1 and self.candidates >= 1,
                "minillm.prompts, max_new_tokens and candidates must be >= 1")
        require(self.steps >= 0 and self.ppo_epochs >= 1, "minillm.steps must be >= 0 and ppo_epochs >= 1")
        require(self.student_lr > 0 and self.teacher_lr > 0, "minillm.student_lr and teacher_lr must be > 0")
        require(0.0 <= self.alpha < 1.0 and 0.0 <= self.gamma <= 1.0 and 0.0 < self.clip < 1.0,
                "minillm.alpha must be in [0, 1), gamma in [0, 1], clip in (0, 1)")
        require(self.lm_coef >= 0, f"minillm.lm_coef must be >= 0, got {self.lm_coef}")


@dataclass(frozen=True)
class DPSettings:
    """Distributed differential privacy (``shared.dp``): off by default.

    On, every device L2-clips its whole secure input to ``l2_clip``, rotates it and adds Skellam
    noise inside the masked sum, calibrated so the sum of ``quorum`` survivors carries noise of std
    noise_multiplier x l2_clip; the aggregator never holds an un-noised sum, so it needs no trust
    for DP. It lives in the masked sum: secure aggregation must be on.
    """

    enabled: bool = False  # devices clip and noise their inputs inside the masked sum (needs secagg)
    # The L2 norm bound of one device's whole input (values, sketch, scores, weight and loss):
    # its sensitivity. Pick it near the fleet's typical update norm; larger inputs are scaled down.
    l2_clip: float = 1.0
    # z: the sum noise's std over l2_clip. 1.0 is DP-FedAvg's usual order; epsilon follows from it,
    # the rounds and delta (shared.dp_account), and is reported after every round.
    noise_multiplier: float = 1.0
    # The fewest survivors the noise is calibrated for; 0: the round's secure-aggregation
    # threshold (the fewest it ever unmasks, so a dropout never lowers the noise below target).
    quorum: int = 0
    # The fleet stops before a round would take epsilon past this; 0: never stops for privacy.
    target_epsilon: float = 0.0
    delta: float = 1e-5  # below 1/N for fleets of up to ~1e5 devices: the usual "delta < 1/N" rule
    ring_bits: int = 32  # the masked ring; 32, the widest SecAgg+ here masks in, leaves most room for noise
    # Bound on the chance that any coordinate of a round's sum wraps around the ring (TFF's
    # modular-clipping probability is 1e-4 per coordinate; this is for the whole vector).
    wrap_probability: float = 1e-6

    def __post_init__(self) -> None:
        require(self.l2_clip > 0, f"dp.l2_clip must be > 0, got {self.l2_clip}")
        require(self.noise_multiplier > 0, f"dp.noise_multiplier must be > 0, got {self.noise_multiplier}")
        require(self.quorum >= 0, f"dp.quorum must be >= 0 (0: the secure-aggregation threshold), got {self.quorum}")
        require(self.target_epsilon >= 0, f"dp.target_epsilon must be >= 0 (0: no stop), got {self.target_epsilon}")
        require(0 < self.delta < 1, f"dp.delta must be in (0, 1), got {self.delta}")
        require(8 <= self.ring_bits <= 32, f"dp.ring_bits must be in 8..32, got {self.ring_bits}")
        require(0 < self.wrap_probability < 1, f"dp.wrap_probability must be in (0, 1), got {self.wrap_probability}")


@dataclass(frozen=True)
class AggregatorConfig:
    broker: str  # mqtt://HOST:PORT or mqtts://HOST:PORT
    student: str  # student base id or path (from_pretrained)
    eval_data: str  # held-out examples: a JSONL/text file or a directory of them (one family per file)
    out_dir: str  # metrics.jsonl, checkpoints/, state.json
    devices: tuple[str, ...] = ()  # insecure mode: the allowed device ids; secure mode: from the registry
    rounds: int = 5  # rounds to run; a restarted aggregator resumes and stops after the same last round
    clients_per_round: int = 0  # 0 = every online device
    # Over-selection against stragglers: invite ceil(clients_per_round x overselect) devices and
    # close the update stage as soon as clients_per_round updates are in (the rest are dropouts).
    overselect: float = 1.0
    quorum: int = 1  # fewest updates for a round to count; fewer and it is abandoned
    min_devices_to_start: int = 1  # wait for this many online devices before a round
    wait_for_devices_s: float = 120.0  # how long to wait for min_devices_to_start before a round starts anyway
    round_timeout_s: float = 300.0  # deadline for updates once a round is announced
    local_steps: int = 20  # training steps per device per round (its profile's max_steps_per_round caps them)
    learning_rate: float = 3e-3  # the devices' local learning rate (sent in the round spec)
    server_lr: float = 1.0  # FedAvg: global += server_lr * weighted mean delta
    # Server optimizer on the round's mean update (all secure aggregation reveals): fedavg,
    # fedavgm (server momentum) or fedadam (Reddi et al. 2021; try server_lr ~ 1e-2 with it).
    server_optimizer: str = "fedavg"
    server_momentum: float = 0.9  # fedavgm's momentum, fedadam's beta1
    server_beta2: float = 0.99  # fedadam
    server_tau: float = 1e-3  # fedadam: adaptivity floor
    # What the aggregator does besides FedAvg: fedit (nothing: LoRA FedAvg, the baseline) or fedkd
    # (the default: teacher -> student and student -> teacher distillation on public data every round).
    mode: str = "fedkd"
    teacher: str | None = None  # the teacher's base, by id or path (from_pretrained); fedkd needs it
    teacher_lora: LoraSettings = field(default_factory=LoraSettings)
    public_data: str | None = None  # the aggregator's public examples (JSONL/text file or directory)
    public_eval_data: str | None = None  # held-out public examples, scored like eval_data
    distil: DistilSettings = field(default_factory=DistilSettings)
    minillm: MiniLLMConfig = field(default_factory=MiniLLMConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    dp: DPSettings = field(default_factory=DPSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    seed: int = 0  # seeds device sampling, index sets, adapter initialisation and distillation: a rerun repeats a run
    eval_max_per_family: int = 50  # held-out examples kept per family (eval_data and public_eval_data)
    eval_batch_size: int = 32  # examples per batch when evaluating
    max_seq_len: int = 128  # longest sequence in tokens the aggregator evaluates and distils on (longer ones are cut)
    protocol: str = "auto"  # MQTT version: auto (5, then 3.1.1), 5 or 3.1.1
    username: str | None = None  # the broker login, when not in a credentials file
    password: str | None = None  # the broker login's password (see allow_plaintext_password)
    ca_file: str | None = None  # CA certificate (PEM) that the broker's TLS certificate must chain to; unset: the system's
    # The broker login file fl-agg broker-config wrote for this client (username and password, 0600),
    # instead of username/password above; ca_file, when given, wins over the file's CA path.
    credentials: str | None = None
    # A password over plain mqtt:// to a host that is not this machine is refused unless this says so.
    allow_plaintext_password: bool = False
    torch_threads: int = 0  # torch's CPU threads; 0 = torch's default
    # Where the aggregator runs the student and the teacher, distillation and evaluation
    # (fl_lm.device): auto (CUDA where torch sees a GPU, else the CPU), cpu, cuda or cuda:N (refused
    # at start when absent). dtype: auto (bf16 autocast where the GPU has it, fp16 on older GPUs,
    # float32 on the CPU), or float32, bfloat16, float16. Weights and adapters stay float32 (the
    # release merges them); only the forward passes are autocast.
    device: str = "auto"
    dtype: str = "auto"
    # Security (on unless ``insecure``): the aggregator's private keys (``fl-agg keygen``) and the
    # registry of enrolled devices' public keys (``fl-agg enroll``). Only enrolled devices count.
    keys: str | None = None
    registry: str | None = None
    # The fleet authority's public key (``fl-authority keygen``): secure aggregation then runs
    # hardened (certified, signed key adverts and a consistency check). Required for secagg.
    authority: str | None = None
    insecure: bool = False  # debug only: no keys, unsigned and unencrypted messages, devices from `devices`
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
    # Under secure aggregation every device weighs 1 (the mean's denominator is the number of
    # contributors): a weight one device states under masks cannot be bounded, and one that claimed
    # 4.95 against four honest 0.012s moved the mean 15x (issue 22). In plain rounds the aggregator
    # sees each update: it clips every value to +-clip and weighs a device by its example count,
    # capped at this (a claim of 2^31 - 1 examples used to own the mean).
    max_weight_examples: int = 1000
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
    # Prometheus /metrics and a /healthz check on this port (aggregator.metrics); 0 = not served.
    metrics_port: int = 0
    # The address they listen on: loopback by default, as they are unauthenticated; 0.0.0.0 for a scraper elsewhere.
    metrics_host: str = "127.0.0.1"

    def mqtt_login(self) -> tuple[str | None, str | None, str | None]:
        """(username, password, ca_file) for the broker, from ``credentials`` or the fields here."""
        from fl_mqtt.credentials import login

        return login(self.credentials or "", self.username, self.password, self.ca_file)

    def __post_init__(self) -> None:
        require(not (self.credentials and (self.username or self.password)),
                "give either credentials (the broker login file) or username/password, not both")
        require(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        check_setting(self.device, self.dtype)
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
        require(1.0 <= self.overselect <= 4.0, f"overselect must be in [1, 4], got {self.overselect}")
        require(self.overselect == 1.0 or self.clients_per_round > 0,
                "overselect > 1 needs clients_per_round (how many updates close the update stage)")
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
        require(0 <= self.metrics_port <= 65535, f"metrics_port must be in 0..65535 (0 = off), got {self.metrics_port}")
        require(bool(self.metrics_host), "metrics_host must not be empty")
        require(self.max_weight_examples >= 1, f"max_weight_examples must be >= 1, got {self.max_weight_examples}")
        require(self.insecure or not self.secagg or self.authority is not None,
                "secagg needs authority (the fleet authority's public key, fl-authority keygen): without it devices "
                "cannot tell a peer's key advert from one the aggregator forged")
        require(self.protocol in ("auto", "5", "3.1.1"), f"protocol must be auto, 5 or 3.1.1, got {self.protocol!r}")
        require(self.server_optimizer in ("fedavg", "fedavgm", "fedadam"),
                f"server_optimizer must be fedavg, fedavgm or fedadam, got {self.server_optimizer!r}")
        require(0.0 <= self.server_momentum < 1.0 and 0.0 <= self.server_beta2 < 1.0 and self.server_tau > 0,
                "server_momentum and server_beta2 must be in [0, 1), server_tau > 0")
        require(self.mode in MODES, f"mode must be one of {sorted(MODES)}, got {self.mode!r}")
        if self.mode in ("fedkd", "fl-minillm"):
            require(self.teacher is not None and self.public_data is not None,
                    f"mode = {self.mode} needs teacher (a model id or path) and public_data (the aggregator's public "
                    "examples); set mode = \"fedit\" for LoRA FedAvg alone")
        require(not self.dp.enabled or self.secagg,
                "dp.enabled needs secagg = true: the DP noise is added inside the masked sum, so a round "
                "without secure aggregation would show the aggregator each device's un-noised update")
        if self.mode == "fl-minillm" and "client" in self.minillm.roles:
            require(self.secagg, "fl-minillm client rounds need secagg: the devices' distributions may only be seen "
                                 "summed (or set minillm.roles = [\"server\"])")


def load(path: str) -> AggregatorConfig:
    return load_file(AggregatorConfig, path)
