"""``fl-agg doctor``: the aggregator's checklist, as ``fl-edge doctor`` is the device's.

One line per check with a verdict (``ok``, ``WARN``, ``FAIL``); exit 1 on any failure. It reads
the config and the files the aggregator keeps and tries the broker's TLS once; it does not start
the service, load a model or write anything.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from aggregator.config import AggregatorConfig

from shared.checklist import FAIL, OK, WARN, Check, guarded
MIN_FREE_BYTES = 4 << 30  # checkpoints, a few kept releases (~250 MB each for the real student), the store


def _store(cfg: AggregatorConfig) -> Check:
    from aggregator import store_check
    from aggregator.store import FILE, Store, StoreError

    out = Path(cfg.out_dir)
    if not (out / FILE).exists():
        return Check("store", OK, f"none yet under {out} (the first `fl-agg run` creates it)")
    try:
        s = Store(out / FILE, create=False)
        try:
            store_check.check(out, s)
            st, announced, latest = s.state(), s.announced(), s.latest_release()
        finally:
            s.close()
    except StoreError as e:
        return Check("store", FAIL, str(e))
    return Check("store", OK, f"{out / FILE}: intact; round {st.round if st else 0} committed, round {announced} announced"
                 + (f", latest release {latest.release_id}" if latest else ""))


def _keys(cfg: AggregatorConfig) -> Check:
    from shared.crypto import load_private_keys

    if cfg.insecure:
        return Check("keys", WARN, "insecure = true: updates accepted unencrypted and unsigned (debug only)")
    if not cfg.keys:
        return Check("keys", FAIL, "keys must be set (fl-edge keygen writes a key pair; the aggregator's is its own)")
    try:
        k = load_private_keys(cfg.keys)  # refuses a key file others can read
    except Exception as e:  # noqa: BLE001
        return Check("keys", FAIL, str(e))
    return Check("keys", OK, f"{cfg.keys} (fingerprint {k.public.fingerprint()}: the one devices pin)")


def _registry(cfg: AggregatorConfig) -> Check:
    from aggregator import registry

    if cfg.insecure:
        return Check("registry", WARN, f"insecure: devices {list(cfg.devices)} are taken by id, unauthenticated")
    if not cfg.registry:
        return Check("registry", FAIL, "registry must be set (fl-agg enroll DEVICE_ID PUBKEY_FILE)")
    try:
        entries = registry.load_entries(cfg.registry)
    except Exception as e:  # noqa: BLE001
        return Check("registry", FAIL, f"{cfg.registry}: {e}")
    if not entries:
        return Check("registry", FAIL, f"{cfg.registry}: no devices enrolled")
    uncertified = sorted(d for d, e in entries.items() if e.cert is None)
    if cfg.secagg and cfg.authority and uncertified:
        return Check("registry", WARN, f"{len(entries)} enrolled; {uncertified} without a certificate cannot pass secure "
                     "aggregation (fl-authority certify, then fl-agg enroll --cert --replace)")
    now = time.time()
    lapsed = {d: e.cert.window_problem(now) for d, e in entries.items() if e.cert is not None and e.cert.window_problem(now)}
    if lapsed:
        # Their peers refuse their adverts: they take no part until re-certified (fl-agg enroll --cert --replace).
        return Check("registry", WARN, f"{len(entries)} enrolled; certificates not valid now: " +
                     "; ".join(f"{d}: {why}" for d, why in sorted(lapsed.items())))
    return Check("registry", OK, f"{len(entries)} devices enrolled" + (", each with a certificate" if not uncertified else ""))


def _authority(cfg: AggregatorConfig) -> Check:
    from aggregator.authority_guard import readable_authority_keys

    if cfg.insecure or not cfg.authority:
        return Check("authority", WARN, "no fleet authority pinned: secure aggregation is the semi-honest protocol "
                     "(an aggregator that deviates is not caught)")
    try:
        found = readable_authority_keys(cfg.authority, cfg.keys)
    except Exception as e:  # noqa: BLE001
        return Check("authority", FAIL, f"{cfg.authority}: {e}")
    if found:
        return Check("authority", FAIL, f"the fleet authority's PRIVATE key is readable here ({', '.join(map(str, found))}): "
                     "an aggregator holding it can certify fake peers and unmask a device; move it off this machine")
    return Check("authority", OK, f"{cfg.authority} pinned; its private key is not readable beside it or beside the keys")


def _broker(cfg: AggregatorConfig, timeout: float) -> Check:
    from fl_mqtt.probe import broker_problem

    try:
        _, _, ca_file = cfg.mqtt_login()
    except Exception as e:  # noqa: BLE001 - a missing or damaged login file is this line's verdict
        return Check("broker", FAIL, f"broker login file: {e}")
    why, what = broker_problem(cfg.broker, ca_file, timeout)
    return Check("broker", FAIL, why) if why else Check("broker", OK, what)


def _disk(cfg: AggregatorConfig) -> Check:
    out = Path(cfg.out_dir)
    probe = out if out.exists() else next((p for p in out.resolve().parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    ok = free >= MIN_FREE_BYTES
    return Check("disk", OK if ok else FAIL, f"{free / 2**30:.1f} GB free under {probe}" +
                 ("" if ok else f" (checkpoints, releases and the store need {MIN_FREE_BYTES / 2**30:.0f} GB)"))


def _release(cfg: AggregatorConfig) -> Check:
    from aggregator import release as rel
    from shared import release
    from shared.crypto import load_private_keys

    root = Path(cfg.out_dir) / "releases"
    cur = rel.current_id(root) if root.exists() else None
    if cur is None:
        return Check("release", OK, "none published yet")
    if cfg.insecure or not cfg.keys:
        return Check("release", WARN, f"{cur}: not verified without the aggregator's key")
    try:
        pub = load_private_keys(cfg.keys).public
        m = rel.kept(root, pub, cfg.release.fleet).get(cur)
        if m is None:
            return Check("release", FAIL, f"latest.json names {cur}, which is not under {root} with a manifest that verifies")
        release.check_files(m, root / cur)
    except Exception as e:  # noqa: BLE001
        return Check("release", FAIL, f"{cur}: {e}")
    return Check("release", OK, f"{cur}: signature and {len(m.files)} file digests verified")


def _audit(cfg: AggregatorConfig) -> Check:
    from aggregator.server import AUDIT_LOG
    from shared import ledger
    from shared.crypto import load_private_keys

    p = Path(cfg.out_dir) / AUDIT_LOG
    if cfg.insecure or not cfg.keys or not p.exists():
        return Check("audit log", OK, f"none yet ({p})")
    try:
        head = ledger.verify(p, load_private_keys(cfg.keys).public)
    except Exception as e:  # noqa: BLE001
        return Check("audit log", FAIL, f"{p} does not verify: {e}")
    return Check("audit log", OK, f"{p}: {head.entries} entries verified, head seq {head.seq}")


def run(cfg: AggregatorConfig, broker_timeout: float = 5.0) -> list[Check]:
    out: list[Check] = []

    def add(name: str, fn: Callable[[], Check]) -> None:
        guarded(out, name, fn)

    add("store", lambda: _store(cfg))
    add("keys", lambda: _keys(cfg))
    add("registry", lambda: _registry(cfg))
    add("authority", lambda: _authority(cfg))
    add("broker", lambda: _broker(cfg, broker_timeout))
    add("disk", lambda: _disk(cfg))
    add("release", lambda: _release(cfg))
    add("audit log", lambda: _audit(cfg))
    return out
