"""Run a whole simulation: prepare, start the broker, the aggregator and N devices, report."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from aggregator import checkpoint
from aggregator.record import RoundRecord
from fl_sim import prepare
from fl_sim.report import write_report
from shared.config import require
from shared.errors import ConfigError

log = logging.getLogger(__name__)

SIM_PROFILE = "cpu-dev"  # every simulated device's profile (firmware_profiles/cpu-dev.toml)
# All linear layers and the input embeddings: on the tiny offline student, LoRA without the
# embeddings learns the private families far slower (benchmarks/README.md, "choosing the set-up").
SIM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens")


@dataclass(frozen=True)
class SimSettings:
    devices: int = 3
    rounds: int = 6
    out: str = "runs/demo"
    broker: str | None = None  # an external broker URL; None: start one per broker_mode
    broker_mode: str = "embedded"  # embedded (amqtt, no TLS) or mosquitto (TLS, passwords, ACLs)
    insecure: bool = False  # turn off end-to-end encryption and signatures (debug only)
    data: str | None = None  # None: the generated task families
    encoding: str | None = None  # of the --data files, when not UTF-8 (with or without a BOM)
    # With data already split (``data`` a directory, one file per device): the aggregator's public
    # set and the held-out sets, instead of carving them out of the devices' files.
    public_data: str | None = None
    eval_data: str | None = None
    public_eval_data: str | None = None
    local_steps: int = 40
    learning_rate: float = 1e-3  # higher rates make LoRA on the tiny student unstable (benchmarks/README.md)
    mode: str = "fedkd"  # fedkd (FedAvg + mutual distillation with the teacher), fl-minillm or fedit (FedAvg only)
    teacher: str | None = None  # teacher id or path; default: the offline teacher built with the student
    teacher_tokenizer: str = "same"  # offline teacher: the student's tokenizer, or its own (metaspace)
    teacher_pretrain_steps: int | None = None  # offline teacher; None: fl_sim.models_cli's default
    distil_steps: int = 20  # per round and direction (fedkd)
    distil_lr: float = 5e-4  # teacher -> student (fedkd); 1e-3 costs the student part of what the fleet taught it
    teacher_lr: float = 2.5e-4  # student -> teacher (fedkd); higher rates make the teacher forget public families
    minillm_steps: int = 6  # fl-minillm: MiniLLM updates per round on the aggregator
    minillm_roles: tuple[str, ...] = ("client", "server")  # fl-minillm: cycled over the rounds
    kd_loss: str = "forward_kl"  # forward_kl, reverse_kl or jsd
    lora_r: int = 16
    server_optimizer: str = "fedavg"
    server_lr: float = 1.0
    quorum: int | None = None  # None: ceil(0.6 * devices)
    round_timeout_s: float = 300.0
    split: str = "dirichlet"
    alpha: float = 0.5
    examples_per_family: int = 200
    eval_per_family: int = 30
    student: str | None = None
    pretrain_steps: int = 800
    seed: int = 0
    keep_received: bool = False
    secagg: bool = True  # secure aggregation: the aggregator learns only the sum
    density: float = 1.0  # fraction of adapter coordinates sent per round
    sparse_method: str = "random"  # random, topk, device_topk (needs secagg off)
    value_bits: int = 0  # resolution of each sent value under secure aggregation (0 = finest)
    clip: float = 0.05
    keep_sent: bool = False  # devices keep a plaintext copy of what they contributed (audit/tests)
    # Sizes the toy pair was tuned with; a real student gets fl_sim.real_pair.REAL_SIZING instead.
    profile: str = SIM_PROFILE  # every simulated device's profile (firmware_profiles/NAME.toml)
    lora_targets: tuple[str, ...] = SIM_LORA_TARGETS  # the student's and the teacher's LoRA modules
    max_seq_len: int = 128  # the aggregator's evaluation, distillation and LM batches (the devices': their profile)
    eval_batch_size: int = 32  # the aggregator's evaluation batch
    distil_batch_size: int = 16  # fedkd's distillation batch, both directions
    minillm_prompts: int = 16  # fl-minillm: public prompts a round (rollouts scored by the fleet, or by the teacher)
    minillm_new_tokens: int = 12  # fl-minillm: tokens a rollout samples
    aggregator_threads: int = 1  # torch threads of the aggregator (0: torch's default)
    release_int8: bool = False  # the ONNX release with int8 weights (its parity gate: fl_lm.onnx_parity)

    def __post_init__(self) -> None:
        require(1 <= self.devices <= 64, f"devices must be in 1..64 on one machine, got {self.devices}")
        require(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        require(self.local_steps >= 1, f"local_steps must be >= 1, got {self.local_steps}")
        require(self.broker_mode in ("embedded", "mosquitto"), f"broker_mode must be embedded or mosquitto, got {self.broker_mode!r}")
        require(self.split in ("dirichlet", "family"), f"split must be dirichlet or family, got {self.split!r}")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        require(self.quorum is None or 1 <= self.quorum <= self.devices, f"quorum must be in 1..{self.devices}, got {self.quorum}")
        require(0.0 < self.density <= 1.0, f"density must be in (0, 1], got {self.density}")
        require(self.sparse_method in ("topk", "random", "device_topk"), f"sparse_method must be topk, random or device_topk, got {self.sparse_method!r}")
        require(not (self.secagg and self.sparse_method == "device_topk"), "device_topk needs --no-secagg")
        require(not (self.secagg and self.devices < 2), "secure aggregation needs at least 2 devices (or --no-secagg)")
        require(0 <= self.value_bits <= 31, f"value_bits must be in 0..31 (0 = finest), got {self.value_bits}")
        require(self.clip > 0, f"clip must be > 0, got {self.clip}")
        require(self.examples_per_family >= 10, "examples_per_family must be >= 10")
        require(self.eval_per_family >= 1, "eval_per_family must be >= 1")
        from aggregator.modes import REGISTRY

        require(self.mode in REGISTRY, f"mode must be one of {sorted(REGISTRY)}, got {self.mode!r}")
        require(self.teacher_tokenizer in ("same", "metaspace"), f"teacher_tokenizer must be same or metaspace, got {self.teacher_tokenizer!r}")
        require(self.distil_steps >= 0, f"distil_steps must be >= 0, got {self.distil_steps}")
        require(self.minillm_steps >= 0, f"minillm_steps must be >= 0, got {self.minillm_steps}")
        require(bool(self.minillm_roles) and all(r in ("client", "server") for r in self.minillm_roles),
                f"minillm_roles must be client and/or server, got {self.minillm_roles!r}")
        require(self.mode != "fl-minillm" or self.teacher_tokenizer == "same",
                "mode fl-minillm needs the teacher to share the student's tokenizer (--teacher-tokenizer same)")
        require(self.distil_lr > 0 and self.teacher_lr > 0, "distil_lr and teacher_lr must be > 0")
        require(self.kd_loss in ("forward_kl", "reverse_kl", "jsd"), f"kd_loss must be forward_kl, reverse_kl or jsd, got {self.kd_loss!r}")
        require(1 <= self.lora_r <= 64, f"lora_r must be in 1..64, got {self.lora_r}")
        require(bool(self.profile), "profile must name a device profile")
        require(bool(self.lora_targets) and all(isinstance(t, str) and t for t in self.lora_targets),
                f"lora_targets must be non-empty module names, got {self.lora_targets!r}")
        require(16 <= self.max_seq_len <= 131072, f"max_seq_len must be in 16..131072, got {self.max_seq_len}")
        require(self.eval_batch_size >= 1 and self.distil_batch_size >= 1, "eval_batch_size and distil_batch_size must be >= 1")
        require(self.minillm_prompts >= 1 and self.minillm_new_tokens >= 1, "minillm_prompts and minillm_new_tokens must be >= 1")
        require(self.aggregator_threads >= 0, f"aggregator_threads must be >= 0 (0: torch's default), got {self.aggregator_threads}")
        if self.data is not None:
            require(Path(self.data).exists(), f"--data {self.data}: no such file or directory")
        for name in ("public_data", "eval_data", "public_eval_data"):
            v = getattr(self, name)
            require(v is None or Path(v).exists(), f"--{name.replace('_', '-')} {v}: no such file or directory")
        require((self.public_data is None) == (self.eval_data is None), "--public-data and --eval-data go together")
        require(self.public_data is None or (self.data is not None and Path(self.data).is_dir()),
                "--public-data/--eval-data need --data DIR with one file per device")

    @property
    def effective_quorum(self) -> int:
        return self.quorum if self.quorum is not None else max(1, math.ceil(0.6 * self.devices))


# The devices' default cohort floor (firmware_profiles/*.toml): a simulation with fewer devices
# lowers it in their configs, and says so (a sum of two inputs tells each device the other's).
SECURE_MIN_COHORT = 3


def make_keys(keydir: Path, device_ids: list[str], authority_dir: Path | None = None) -> dict[str, str]:
    """Fresh keys for a fleet authority, the aggregator and every device; each device certified by
    the authority and enrolled, with its certificate, in the registry.

    The authority's private key goes to its own directory, ``authority_dir`` (default: ``authority``
    beside ``keydir``; 0700, the key 0600), never into ``keydir``, where the aggregator's key is:
    an aggregator that can read it can certify fake peers and unmask a device. Only its public key
    is copied into ``keydir`` (``authority_pub``), for the aggregator and the devices to pin. On one
    machine this is a layout, not a wall (every process runs as one user); a real fleet keeps the
    authority's key on another machine (``fl-authority``)."""
    from aggregator import registry
    from shared import authority
    from shared.crypto import generate_keys, save_private_keys, save_public_keys

    authdir = authority_dir if authority_dir is not None else keydir.parent / "authority"
    keydir.mkdir(parents=True, exist_ok=True)
    if authdir.resolve().is_relative_to(keydir.resolve()):
        raise ConfigError(f"the authority's directory {authdir} must lie outside the aggregator's key directory {keydir}")
    authdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    authdir.chmod(0o700)  # an existing directory keeps its mode through mkdir
    (keydir / "authority.key").unlink(missing_ok=True)  # an older run's layout put it beside the aggregator's
    reg = keydir / "registry.json"
    reg.unlink(missing_ok=True)
    auth = generate_keys()
    save_private_keys(auth, authdir / "authority.key", overwrite=True)
    save_public_keys(auth.public, authdir / "authority.pub.json")
    save_public_keys(auth.public, keydir / "authority.pub.json")
    paths = {"authority_pub": str(keydir / "authority.pub.json"), "authority_key": str(authdir / "authority.key")}
    for name in ["aggregator", *device_ids]:
        k = generate_keys()
        paths[name] = str(save_private_keys(k, keydir / f"{name}.key", overwrite=True))
        save_public_keys(k.public, keydir / f"{name}.pub.json")
        if name != "aggregator":
            cert = authority.certify(name, k.public, auth)
            (keydir / f"{name}.cert.json").write_text(cert.to_json())
            paths[f"{name}_cert"] = str(keydir / f"{name}.cert.json")
            registry.enroll(reg, name, k.public, cert=cert, authority_keys=auth.public)
    paths["aggregator_pub"] = str(keydir / "aggregator.pub.json")
    paths["registry"] = str(reg)
    return paths


def _start_mosquitto(fleet: Fleet, out: Path, device_ids: list[str]) -> tuple[str, dict[str, dict]]:
    """Mosquitto with our generated config: TLS, per-device passwords, ACLs. Returns URL and logins."""
    import shutil

    from aggregator.broker_config import MqttCredentials, write_broker_config

    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise RuntimeError("--broker-mode mosquitto needs Mosquitto installed (apt-get install mosquitto)")
    port = _free_port()
    # A fresh config every run (the simulation's keys are fresh too), with a read-only auditor account.
    files = write_broker_config(out / "broker", device_ids, tls=True, port=port, host="127.0.0.1", force=True,
                                observers=["auditor"])
    proc = fleet.start("broker", [exe, "-c", str(files.conf_path)], python=False)
    _wait_port(port, proc)
    logins = {}
    for name, path in [*files.credentials.items(), ("aggregator", files.aggregator_credentials)]:
        c = MqttCredentials.load(path)
        logins[name] = {"username": c.username, "password": c.password, "ca_file": c.ca_file}
    return f"mqtts://127.0.0.1:{port}", logins


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"broker did not listen on {port} within {timeout}s")


class Fleet:
    """The child processes, with their logs in ``out/logs``; stopped on exit whatever happens."""

    def __init__(self, out: Path) -> None:
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], python: bool = True) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        f = (self.logs / f"{name}.log").open("w")
        p = subprocess.Popen([sys.executable, *args] if python else args, stdout=f, stderr=subprocess.STDOUT, env=env)
        self.procs[name] = p
        return p

    def stop_all(self, grace: float = 10.0) -> None:
        """Give devices and aggregator ``grace`` seconds to exit on their own; the broker never does."""
        deadline = time.monotonic() + grace
        for name, p in self.procs.items():
            while name != "broker" and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
        for name, p in self.procs.items():
            if p.poll() is None:
                log.debug("terminating %s", name)
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()


@dataclass
class Launched:
    """A running simulation: the processes, and what they were started with."""

    settings: SimSettings
    out: Path
    fleet: Fleet
    aggregator: subprocess.Popen
    broker: str
    student: str
    teacher: str | None
    device_ids: list[str]
    t0: float
    baselines: dict  # fl_sim.baselines, plus how many held-out examples are scored of how many


def forget_old_fleet(out: Path) -> None:
    """Each simulation is a new fleet with fresh keys: the last run's aggregator progress and the
    devices' durable state (sequence numbers, rounds seen, outboxes) belong to the old fleet. Left
    in place, the aggregator would carry on numbering after the old announcements and stop at once
    (a second `make demo` into the same directory ran no rounds)."""
    # The audit log too: it is signed with the old fleet's aggregator key, and a new aggregator
    # would take it for a damaged one (it is kept aside then, never extended).
    for stale in ("metrics.jsonl", "audit.jsonl", "audit_check.json", "audit/report.html", *checkpoint.RUN_STATE):
        (out / stale).unlink(missing_ok=True)
    shutil.rmtree(out / "edge", ignore_errors=True)


def prepare_data(s: SimSettings, out: Path, private_under_devices: bool = False) -> tuple[prepare.SimData, prepare.DataPaths]:
    """The run's data: a shard per device (with ``private_under_devices``, inside each device's
    own directory, as a simulation keeps them; else under OUT/data/ to hand out), the held-out and
    public sets under OUT/data/."""
    if s.data and s.public_data and s.eval_data:
        data = prepare.laid_out(Path(s.data), Path(s.public_data), Path(s.eval_data),
                                Path(s.public_eval_data) if s.public_eval_data else None, s.devices, s.encoding)
    elif s.data:
        data = prepare.user_data(Path(s.data), s.devices, s.seed, s.encoding)
    else:
        data = prepare.generated(s.devices, s.examples_per_family, s.eval_per_family, s.split, s.alpha, s.seed)
    return data, prepare.write_data(out, data, prepare.shard_under_device if private_under_devices else None)


def launch(s: SimSettings) -> Launched:
    """Prepare data and models, start the broker (unless given), the aggregator and the devices."""
    out = Path(s.out)
    if s.student or s.teacher:
        from fl_lm.loading import check_model_source

        for what, src in (("--student", s.student), ("--teacher", s.teacher)):
            if src:
                check_model_source(src, what)
    if s.student:
        check_trainable(s.student, s, "--student")  # before any data is prepared or model built
    out.mkdir(parents=True, exist_ok=True)
    forget_old_fleet(out)
    t0 = time.monotonic()
    data, paths = prepare_data(s, out, private_under_devices=True)
    shard_paths, eval_dir = paths.shards, paths.eval_dir
    log.info("data: %s examples on %d devices, %d held-out families, %d public examples on the aggregator",
             [len(x) for x in data.shards], s.devices, len(data.heldout), len(data.public))
    student, teacher = s.student, s.teacher
    if student is None or (teacher is None and s.mode != "fedit"):
        from fl_sim.models_cli import build_default

        if s.data and student is None:
            from fl_sim.real_pair import toy_on_real_text_warning

            log.warning("%s", toy_on_real_text_warning())
        log.info("building offline models (tokenizer, student, teacher) from the public set only ...")
        built = build_default(out / "models", s.seed, s.pretrain_steps, public=data.public, generic=not s.data,
                              teacher_pretrain_steps=s.teacher_pretrain_steps, teacher_tokenizer=s.teacher_tokenizer)
        student = student or built["student"]
        teacher = teacher or built["teacher"]
    if s.student is None:
        check_trainable(student, s, "the built student")
    baselines = _baselines(student, data, max(s.eval_per_family, 1))
    device_ids = [f"device-{i}" for i in range(s.devices)]
    fleet = Fleet(out)
    logins: dict[str, dict] = {}
    if s.insecure:
        log.warning("SECURITY OFF (--insecure): updates travel unencrypted and unsigned. Debug use only.")
        security: dict[str, dict] = {"aggregator": {"insecure": True, "devices": device_ids}}
        security.update({d: {"insecure": True} for d in device_ids})
    else:
        keys = make_keys(out / "keys", device_ids)
        security = {"aggregator": {"keys": keys["aggregator"], "registry": keys["registry"], "authority": keys["authority_pub"]}}
        security.update({d: {"keys": keys[d], "aggregator_keys": keys["aggregator_pub"], "authority_keys": keys["authority_pub"],
                             "cert": keys[f"{d}_cert"]} for d in device_ids})
    try:
        if s.broker:
            broker, protocol = s.broker, "auto"
        elif s.broker_mode == "mosquitto":
            broker, logins = _start_mosquitto(fleet, out, device_ids)
            protocol = "auto"
            log.info("Mosquitto on %s with TLS, per-device passwords and ACLs", broker)
        else:
            port = _free_port()
            bp = fleet.start("broker", ["-m", "fl_sim.broker", "--port", str(port)])
            _wait_port(port, bp)
            broker, protocol = f"mqtt://127.0.0.1:{port}", "3.1.1"  # amqtt speaks 3.1.1 only
            log.warning("embedded broker on %s: no TLS, anonymous (one-machine simulation only)", broker)
        agg_cfg = prepare.write_json(out / "config" / "aggregator.json", {
            "broker": broker, "student": student, "eval_data": str(eval_dir), "out_dir": str(out),
            "rounds": s.rounds, "quorum": s.effective_quorum,
            "min_devices_to_start": s.devices, "wait_for_devices_s": 180.0, "round_timeout_s": s.round_timeout_s,
            "local_steps": s.local_steps, "learning_rate": s.learning_rate, "seed": s.seed, "protocol": protocol,
            "torch_threads": s.aggregator_threads, "eval_max_per_family": max(s.eval_per_family, 1),
            "eval_batch_size": s.eval_batch_size, "max_seq_len": s.max_seq_len, "keep_received": s.keep_received,
            "secagg": s.secagg, "density": s.density, "sparse_method": s.sparse_method, "value_bits": s.value_bits, "clip": s.clip,
            "lora": {"r": s.lora_r, "alpha": 2.0 * s.lora_r, "target_modules": list(s.lora_targets)},
            "release": {"int8": s.release_int8},
            "server_optimizer": s.server_optimizer, "server_lr": s.server_lr,
            "mode": s.mode, "public_data": str(paths.public),
            **({"public_eval_data": str(paths.public_eval_dir)} if paths.public_eval_dir else {}),
            **({"teacher": teacher, "teacher_lora": {"r": s.lora_r, "alpha": 2.0 * s.lora_r, "target_modules": list(s.lora_targets)},
                "distil": {"loss": s.kd_loss, "student_steps": s.distil_steps, "teacher_steps": s.distil_steps,
                           "student_lr": s.distil_lr, "teacher_lr": s.teacher_lr, "batch_size": s.distil_batch_size},
                "minillm": {"steps": s.minillm_steps, "roles": list(s.minillm_roles), "prompts": s.minillm_prompts,
                            "max_new_tokens": s.minillm_new_tokens}}
               if s.mode != "fedit" else {}),
            **security["aggregator"], **logins.get("aggregator", {}),
        })
        agg = fleet.start("aggregator", ["-m", "aggregator.cli", "run", "--config", str(agg_cfg)])
        for dev, shard in zip(device_ids, shard_paths):
            cfg = prepare.write_json(out / "config" / f"{dev}.json", {
                "device_id": dev, "broker": broker, "data": str(shard), "student": student, "profile": s.profile,
                "work_dir": str(out / "edge" / dev), "protocol": protocol, "idle_timeout_s": s.round_timeout_s + 600,
                "keep_sent": s.keep_sent,
                # Devices refuse a round without secure aggregation unless told they may take one.
                **({"allow_plain_rounds": True} if not s.secagg else {}),
                **({"secagg_min_cohort": s.devices} if s.secagg and s.devices < SECURE_MIN_COHORT else {}),
                **security[dev], **logins.get(dev, {}),
            })
            fleet.start(dev, ["-m", "edge_client.cli", "run", "--config", str(cfg)])
    except BaseException:
        fleet.stop_all(grace=0)
        raise
    if s.secagg and s.devices < SECURE_MIN_COHORT:
        log.warning("%d devices: below the devices' default secure-aggregation cohort floor of %d; lowered to %d in "
                    "their configs (a secure sum of two inputs tells each device the other's)", s.devices,
                    SECURE_MIN_COHORT, s.devices)
    log.info("started aggregator and %d devices; logs in %s", s.devices, fleet.logs)
    return Launched(s, out, fleet, agg, broker, student, teacher if s.mode != "fedit" else None, device_ids, t0, baselines)


def check_trainable(student: str, s: SimSettings, what: str) -> None:
    """Whether every simulated device's profile can train ``student`` with the rounds' LoRA, asked
    of the memory planner (as each device will ask it) before any process starts: a ConfigError in
    one line naming the student, the profile and what does not fit."""
    from edge_client import planner
    from fl_lm import device
    from shared.messages import LoraSpec
    from shared.profiles import load_profile

    profile = load_profile(s.profile)
    if s.lora_r > profile.max_lora_rank:
        raise ConfigError(f"--lora-r {s.lora_r}: device profile {profile.name} allows at most {profile.max_lora_rank}")
    lora = LoraSpec(r=s.lora_r, alpha=2.0 * s.lora_r, dropout=0.0, target_modules=s.lora_targets)
    # The devices' configs leave device and dtype at auto: this machine's placement is theirs.
    placement = device.resolve("auto", "auto")
    shape = planner.shape_of(student)
    try:
        p = planner.plan(profile, shape, lora, placement)
    except planner.PlanError as e:
        raise ConfigError(f"{what} {student} ({shape.params / 1e6:,.1f}M params, LoRA r {s.lora_r}) cannot be trained: "
                          f"{e}") from None
    log.info("devices (profile %s, %s) will train %s at batch %d x seq %d, predicted peak %.2f of %.2f GB", profile.name,
             placement.describe(), student, p.setting.batch, p.setting.seq, p.predicted["peak"] / planner.GB,
             p.budget / planner.GB)


def no_round_completed(records: list[dict]) -> str:
    """"" when a round of the run completed; otherwise one line saying none did, and why (the
    records are metrics.jsonl's, each with its ``status``: baseline, ok or abandoned)."""
    rounds = [r for r in records if r.get("status") != "baseline"]
    if any(r.get("status") == "ok" for r in rounds):
        return ""
    if not rounds:
        return "no round completed: the aggregator recorded none"
    reasons = sorted({str(r.get("abandon_reason") or r.get("status")) for r in rounds})
    return f"no round completed: all {len(rounds)} were abandoned ({'; '.join(reasons)})"


def _records(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def finish(run: Launched) -> Path:
    """Follow progress until the aggregator exits, stop everything, write the report; a run in
    which no round completed then fails (RuntimeError, in one line), after its report is written."""
    s = run.settings
    try:
        _follow(run.out / "metrics.jsonl", run.aggregator, s.rounds, run.fleet)
        if run.aggregator.returncode != 0:
            raise RuntimeError(f"aggregator exited with code {run.aggregator.returncode}; see {run.fleet.logs / 'aggregator.log'}")
    finally:
        run.fleet.stop_all()
    settings = {**{k: v for k, v in asdict(s).items() if v is not None}, "student": run.student, "quorum": s.effective_quorum,
                **({"teacher": run.teacher} if run.teacher else {}),
                "broker": run.broker, "wall_time_s": round(time.monotonic() - run.t0, 1)}
    (run.out / "settings.json").write_text(json.dumps(settings, indent=2))
    records = _records(run.out / "metrics.jsonl")
    failed = no_round_completed(records)
    if not records:  # nothing to report on, not even the baseline
        raise RuntimeError(f"{failed}; logs in {run.fleet.logs}")
    audit = audit_check(run.out)
    if audit is not None:
        settings["audit"] = {"ok": audit["ok"], "problems": len(audit["problems"]), "file": "audit_check.json",
                             "report": "audit/report.html"}
    report = write_report(run.out, settings, run.baselines, where_the_data_is(run.out))
    if failed:
        raise RuntimeError(f"{failed}; report {report}, logs in {run.fleet.logs}")
    return report


def where_the_data_is(out: Path) -> list[str]:
    """Lines for the reports: each device's private shard, inside that device's own directory, and
    the aggregator's inputs (the public and held-out sets), which no device's data is in."""
    lines = [f"{d.name}'s private data: {d / prepare.PRIVATE_DIR}/ (its process alone reads it; it never leaves the device)"
             for d in sorted((out / "edge").iterdir()) if (d / prepare.PRIVATE_DIR).is_dir()] if (out / "edge").is_dir() else []
    lines.append(f"the aggregator's inputs: {out / 'data'}/ (the public set and the held-out sets; no device's private data)")
    return lines


def audit_check(out: Path) -> dict | None:
    """``fl-audit check`` on the run (the aggregator's audit log against every device's ledger),
    written to OUT/audit_check.json, and ``fl-audit report``'s page of it, OUT/audit/report.html;
    None where the run was insecure (nothing is signed)."""
    from shared.audit import cross_check
    from shared.audit_report import write_report as write_audit_report
    from shared.crypto import load_public_keys

    keys, log_file = out / "keys", out / "audit.jsonl"
    if not log_file.exists() or not (keys / "aggregator.pub.json").exists():
        return None
    devices = {d.name: (d / "ledger.jsonl", load_public_keys(keys / f"{d.name}.pub.json"))
               for d in sorted((out / "edge").iterdir()) if (d / "ledger.jsonl").exists() and (keys / f"{d.name}.pub.json").exists()}
    agg_key = load_public_keys(keys / "aggregator.pub.json")
    res = cross_check(log_file, agg_key, devices)
    (out / "audit_check.json").write_text(json.dumps(res, indent=2))
    page, _ = write_audit_report(out / "audit", log_file, agg_key, devices, metrics=out / "metrics.jsonl", check=res,
                                 data_notes=where_the_data_is(out))
    log.info("audit report: %s", page)
    if res["ok"]:
        log.info("audit: the aggregator's log and %d device ledgers agree (audit_check.json)", len(devices))
    else:
        log.warning("audit: %d mismatch(es) between the aggregator's log and the device ledgers: %s", len(res["problems"]),
                    "; ".join(res["problems"][:3]))
    return res


def _baselines(student: str, data: prepare.SimData, cap: int) -> dict:
    from fl_lm.loading import load_tokenizer
    from fl_sim.baselines import loss_baselines

    scored = {f: exs[:cap] for f, exs in data.heldout.items()}  # what the aggregator scores (aggregator.server.load_eval)
    b = loss_baselines(load_tokenizer(student), (e for shard in data.shards for e in shard), scored)
    return {**b, "scored": sum(map(len, scored.values())), "available": sum(map(len, data.heldout.values())), "cap": cap}


def simulate(s: SimSettings) -> Path:
    return finish(launch(s))


def _progress(r: RoundRecord, rounds: int) -> str:
    def em(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    line = (f"round {r.round}/{rounds} {r.status:<9} updates {len(r.received)}/{len(r.participants)}  "
            f"student loss {r.mean_loss:.4f} exact match {em(r.mean_exact_match)}")
    if r.student.public is not None:
        line += f" (public families {r.student.public.mean_loss:.4f} / {em(r.student.public.mean_exact_match)})"
    if r.teacher is not None:
        line += f"  teacher {r.teacher.private.mean_loss:.4f} / {em(r.teacher.private.mean_exact_match)}"
    if r.distil:
        line += f"  distil {r.distil['seconds']:.1f}s"
    return line


def _last_error(log_file: Path) -> str:
    """The last ERROR line of a process's log, else its last line (a traceback's exception): why
    it stopped, in one line."""
    try:
        lines = [x.strip() for x in log_file.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    errors = [x for x in lines if " ERROR " in x]
    return ((errors or lines or ["empty log"])[-1])[:300]


def _follow(metrics: Path, agg: subprocess.Popen, rounds: int, fleet: Fleet | None = None) -> None:
    """Show progress as the aggregator writes rounds, until it exits. A device process that exits
    with an error is named at once, and when every device has, the run stops (RuntimeError)
    instead of the aggregator waiting out its timeouts for devices that are gone."""
    seen = 0
    told: set[int] = set()  # pids whose exit was reported
    while True:
        done = agg.poll() is not None
        if fleet is not None and not done:
            devices = {n: p for n, p in fleet.procs.items() if n.startswith("device-")}
            failed = sorted(n for n, p in devices.items() if p.poll() not in (None, 0))
            for n in failed:
                if devices[n].pid not in told:
                    told.add(devices[n].pid)
                    log.warning("%s exited with code %d: %s", n, devices[n].returncode, _last_error(fleet.logs / f"{n}.log"))
            if devices and len(failed) == len(devices):
                first = failed[0]
                raise RuntimeError(f"every device exited before the run ended ({first}: {_last_error(fleet.logs / f'{first}.log')}); "
                                   f"logs in {fleet.logs}")
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            for line in lines[seen:]:
                if line.strip():
                    log.info("%s", _progress(RoundRecord.from_json(json.loads(line)), rounds))
            seen = len(lines)
        if done:
            return
        time.sleep(0.5)
