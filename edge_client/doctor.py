"""``fl-edge doctor``: why a device does not join, as a checklist a device installer can read.

Each check gives one line with a verdict: ``ok``, ``WARN`` (works, but not as planned) or
``FAIL`` (the device cannot take part until it is fixed). The checks read the device's config
and files and try the broker once; they load no model weights and start no round. The exit
status is 1 when any check fails.
"""

from __future__ import annotations

import importlib.metadata as md
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_client.config import EdgeConfig

from shared.checklist import FAIL, OK, WARN, Check, guarded
MIN_FREE_BYTES = 2 << 30  # a real release is ~180-260 MB, state and checkpoints a few more: 2 GB is a floor
RENEW_DAYS = 30  # a certificate this close to its end is a warning: renewal goes through the offline authority
REQUIRED = ("torch", "transformers", "peft", "onnxruntime", "paho-mqtt", "cryptography", "numpy", "safetensors")


def _python(cfg: EdgeConfig) -> Check:
    v = sys.version_info
    ok = v >= (3, 10)
    return Check("python", OK if ok else FAIL, f"{sys.version.split()[0]}" + ("" if ok else " (3.10 or newer is needed)"))


def _packages(cfg: EdgeConfig) -> Check:
    have, missing = [], []
    for p in REQUIRED:
        try:
            have.append(f"{p} {md.version(p)}")
        except md.PackageNotFoundError:
            missing.append(p)
    if missing:
        return Check("packages", FAIL, f"missing {', '.join(missing)} (pip install '.[edge]'; on JetPack NVIDIA's torch first)")
    return Check("packages", OK, ", ".join(have))


def _torch(cfg: EdgeConfig, profile: Any) -> Check:
    import torch

    gpu = torch.cuda.is_available()
    build = f"torch {torch.__version__} ({'CUDA ' + str(torch.version.cuda) if torch.version.cuda else 'CPU build'})"
    if profile.compute_capability and not gpu:
        return Check("gpu", FAIL if cfg.device == "cuda" else WARN,
                     f"profile {profile.name} expects a CUDA GPU (sm_{profile.compute_capability.replace('.', '')}) and "
                     f"{build} sees none: training would run on the CPU" +
                     (" and device = cuda refuses to" if cfg.device == "cuda" else ""))
    if gpu:
        major, minor = torch.cuda.get_device_capability()
        return Check("gpu", OK, f"{build}, {torch.cuda.get_device_name()} (sm_{major}{minor})")
    return Check("gpu", OK, f"{build}; profile {profile.name} plans for the CPU")


def _onnxruntime(cfg: EdgeConfig, profile: Any) -> Check:
    import onnxruntime as ort

    have = ort.get_available_providers()
    wanted = [p for p in profile.ort_providers if p in have]
    if not wanted:
        return Check("onnxruntime", FAIL, f"none of the profile's providers {list(profile.ort_providers)} is available ({have})")
    missing = [p for p in profile.ort_providers if p not in have]
    return Check("onnxruntime", WARN if missing else OK, f"{ort.__version__}, providers {have}" +
                 (f"; the profile's {missing} are missing" if missing else ""))


def _plan(cfg: EdgeConfig, profile: Any) -> Check:
    from edge_client import planner
    from fl_lm import device
    from fl_lm.loading import check_model_source

    try:
        check_model_source(cfg.student, "student")
        shape = planner.shape_of(cfg.student)
        p = planner.plan(profile, shape, planner.SMALLEST_LORA, device.expected(profile.compute_capability, cfg.dtype))
    except Exception as e:  # noqa: BLE001 - every reason the plan fails is this check's line
        return Check("memory plan", FAIL, f"student {cfg.student}: {e}")
    s = p.setting
    return Check("memory plan", OK, f"student {cfg.student} ({shape.params / 1e6:.1f}M params) fits profile {profile.name}: "
                 f"batch {s.batch} x seq {s.seq}, predicted {p.predicted['peak'] / 2**30:.2f} of {p.budget / 2**30:.2f} GB")


def _keys(cfg: EdgeConfig) -> Check:
    from shared.crypto import load_private_keys, load_public_keys

    if cfg.insecure:
        return Check("keys", WARN, "insecure = true: no keys, updates go unencrypted and unsigned (debug only)")
    if not cfg.keys or not cfg.aggregator_keys:
        return Check("keys", FAIL, "keys and aggregator_keys must be set (fl-edge keygen; the operator gives the aggregator's)")
    try:
        mine = load_private_keys(cfg.keys)  # refuses a key file others can read
        agg = load_public_keys(cfg.aggregator_keys)
    except Exception as e:  # noqa: BLE001
        return Check("keys", FAIL, str(e))
    return Check("keys", OK, f"{cfg.keys} (mode {Path(cfg.keys).stat().st_mode & 0o777:o}, fingerprint "
                 f"{mine.public.fingerprint()}); aggregator pinned at {agg.fingerprint()}")


def _certificate(cfg: EdgeConfig) -> Check:
    from shared import authority
    from shared.crypto import load_public_keys

    if cfg.insecure:
        return Check("certificate", WARN, "insecure: secure aggregation is off")
    if not cfg.cert or not cfg.authority_keys:
        return Check("certificate", FAIL, "cert and authority_keys must be set: without them the device declines every "
                     "secure round (fl-authority certify on the operator's machine)")
    try:
        cert = authority.load(cfg.cert)
        keys = authority.verify(cert, load_public_keys(cfg.authority_keys), cfg.device_id, now=time.time())
    except Exception as e:  # noqa: BLE001
        return Check("certificate", FAIL, f"{cfg.cert}: {e}")
    mine = _own_public(cfg)
    if mine is None:
        return Check("certificate", WARN, f"{cfg.cert}: certified by the pinned authority; not compared with the device's "
                     "keys (see the keys line)")
    if keys != mine:
        return Check("certificate", FAIL, f"{cfg.cert} certifies other keys than {cfg.keys} (keys regenerated since?)")
    if cert.not_after is None:
        return Check("certificate", WARN, f"{cfg.cert}: certified, but with no validity window (signed before windows "
                     "existed); re-certify it (fl-authority certify)")
    left = (cert.not_after - time.time()) / 86400
    until = f"valid until {authority.iso_time(cert.not_after)}"
    if left < RENEW_DAYS:
        return Check("certificate", WARN, f"{cfg.cert}: {until}, {left:.0f} days left: ask the operator for a new one")
    return Check("certificate", OK, f"{cfg.cert}: {cfg.device_id} certified by the pinned authority, for this device's keys, "
                 f"{until}")


def _own_public(cfg: EdgeConfig) -> Any:
    """The device's own public keys, or None when its key file cannot be read (the keys check says why)."""
    from shared.crypto import load_private_keys

    try:
        return load_private_keys(cfg.keys).public if cfg.keys else None
    except Exception:  # noqa: BLE001
        return None


def _broker(cfg: EdgeConfig, timeout: float, login: bool) -> Check:
    from fl_mqtt.probe import broker_problem

    try:
        user, password, ca_file = cfg.mqtt_login()
    except Exception as e:  # noqa: BLE001 - a missing or damaged login file is this line's verdict
        return Check("broker", FAIL, f"broker login file: {e}")
    why, tls = broker_problem(cfg.broker, ca_file, timeout, now=time.time())
    if why:
        return Check("broker", FAIL, why)
    if not login:
        # The broker gives each account one session (use_username_as_clientid): logging in as the
        # device would take over a running client's session and its queued messages.
        return Check("broker", OK, f"{tls}; MQTT login not tried (fl-edge doctor --login, with the device's client stopped)")
    from fl_mqtt.link import LinkError, MqttLink

    link = MqttLink(f"{cfg.device_id}-doctor", cfg.broker, username=user, password=password, ca_file=ca_file,
                    protocol=cfg.protocol, allow_plaintext_password=cfg.allow_plaintext_password)
    try:
        link.connect(timeout=timeout)
    except (LinkError, OSError, ValueError) as e:
        return Check("broker", FAIL, f"{cfg.broker}: MQTT login as {user!r} refused or unanswered: {e}")
    finally:
        try:
            link.close()
        except Exception:  # noqa: BLE001 - closing a link that never opened
            pass
    return Check("broker", OK, f"{cfg.broker}: {tls}, logged in as {user!r}")


def _disk(cfg: EdgeConfig) -> Check:
    work = Path(cfg.work_dir)
    probe = work if work.exists() else next((p for p in work.resolve().parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    verdict = OK if free >= MIN_FREE_BYTES else FAIL
    return Check("disk", verdict, f"{free / 2**30:.1f} GB free under {probe}" +
                 ("" if verdict == OK else f" (state, checkpoints and a release need {MIN_FREE_BYTES / 2**30:.0f} GB)"))


def _release(cfg: EdgeConfig) -> Check:
    from edge_client.releases import ReleaseStore
    from shared.crypto import load_public_keys

    if cfg.insecure or not cfg.aggregator_keys:
        return Check("release", WARN, "releases are verified under the aggregator's key; insecure mode installs none")
    root = Path(cfg.releases_dir or Path(cfg.work_dir) / "releases")
    if not root.exists():
        return Check("release", OK, f"none installed yet ({root})")
    try:
        cur = ReleaseStore(root, load_public_keys(cfg.aggregator_keys), cfg.fleet).current()
    except Exception as e:  # noqa: BLE001
        return Check("release", FAIL, f"the current release under {root} does not verify: {e} (the aggregator sends the "
                     "latest again once the device is online)")
    if cur is None:
        return Check("release", OK, f"none installed yet ({root})")
    m, _ = cur
    return Check("release", OK, f"{m.release_id} (round {m.round}, {m.quantization}), signature and {len(m.files)} file digests verified")


def _ledger(cfg: EdgeConfig) -> Check:
    from edge_client.client import LEDGER_FILE
    from shared import ledger

    p = Path(cfg.work_dir) / LEDGER_FILE
    if cfg.insecure or not cfg.keys or not p.exists():
        return Check("ledger", OK, f"none yet ({p})")
    mine = _own_public(cfg)
    if mine is None:
        return Check("ledger", WARN, f"{p}: not checked without the device's keys (see the keys line)")
    try:
        head = ledger.verify(p, mine)
    except Exception as e:  # noqa: BLE001
        return Check("ledger", FAIL, f"{p} does not verify: {e}")
    return Check("ledger", OK, f"{p}: {head.entries} entries verified, head seq {head.seq}")


def run(cfg: EdgeConfig, broker_timeout: float = 5.0, login: bool = False) -> list[Check]:
    """Every check, in the order an installer fixes things; a check that raises is its own FAIL line."""
    from shared.profiles import load_profile

    out: list[Check] = []

    def add(name: str, fn: Callable[[], Check]) -> None:
        guarded(out, name, fn)

    add("python", lambda: _python(cfg))
    add("packages", lambda: _packages(cfg))
    try:
        profile = load_profile(cfg.profile)
        out.append(Check("profile", OK, f"{profile.name}: {profile.description}"))
    except Exception as e:  # noqa: BLE001
        out.append(Check("profile", FAIL, f"{cfg.profile}: {e}"))
        profile = None
    if profile is not None:
        add("gpu", lambda: _torch(cfg, profile))
        add("onnxruntime", lambda: _onnxruntime(cfg, profile))
        add("memory plan", lambda: _plan(cfg, profile))
    add("keys", lambda: _keys(cfg))
    add("certificate", lambda: _certificate(cfg))
    add("broker", lambda: _broker(cfg, broker_timeout, login))
    add("disk", lambda: _disk(cfg))
    add("release", lambda: _release(cfg))
    add("ledger", lambda: _ledger(cfg))
    return out
