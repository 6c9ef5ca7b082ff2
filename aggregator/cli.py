"""``fl-agg``: run the aggregator; make its keys; enroll devices; write a broker config."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

from shared import cli, log_format
from shared.cli import add_debug

log = logging.getLogger("fl-agg")


def keygen(out: Path, force: bool) -> None:
    """``aggregator.key`` (0600) and ``aggregator.pub.json`` (pin it in every device's config)."""
    from shared.crypto import write_keypair

    priv, pub = write_keypair(out, "aggregator", overwrite=force)
    log.info("wrote %s (private, 0600) and %s", priv, pub)


def enroll(device_id: str, pubkey_file: Path, registry_path: Path, replace: bool = False,
           cert_file: Path | None = None, authority_file: Path | None = None) -> None:
    from aggregator import registry
    from shared import authority
    from shared.crypto import load_public_keys

    pub = load_public_keys(pubkey_file)
    cert = authority.load(cert_file) if cert_file else None
    auth = load_public_keys(authority_file) if authority_file else None
    if cert is None:
        log.warning("enrolling %s WITHOUT a fleet-authority certificate: it cannot take part in secure "
                    "aggregation (fl-authority certify, then --cert)", device_id)
    registry.enroll(registry_path, device_id, pub, replace=replace, cert=cert, authority_keys=auth)
    log.info("enrolled %s (key fingerprint %s) in %s", device_id, pub.fingerprint(), registry_path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fl-agg", description="FL-MiniLLM aggregator")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--log-format", choices=log_format.FORMATS, default="text",
                    help="text (one line a record) or json (one JSON object a line: time, level, logger, message)")
    add_debug(ap)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run federated rounds")
    run.add_argument("--config", required=True, help="aggregator config (.json or .toml)")
    run.add_argument("--fresh", action="store_true",
                     help="start a NEW store (the old one is moved aside, never deleted): for a store that is damaged "
                          "and has no backup; the trained model is not resumed")
    dr = sub.add_parser("doctor", help="a checklist of the aggregator's store, keys, registry, authority, broker, disk, "
                                       "release and audit log (exit 1 on any failure)")
    dr.add_argument("--config", required=True, help="the aggregator's config")
    dr.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker")
    bk = sub.add_parser("backup", help="a consistent copy of the aggregator's store and current checkpoints (safe while it runs)")
    bk.add_argument("--config", required=True, help="the aggregator's config")
    bk.add_argument("--out", required=True, type=Path, help="a new directory for the backup")
    rs = sub.add_parser("restore", help="check a backup, then make it the aggregator's store (the old one moved aside)")
    rs.add_argument("backup", type=Path, help="a directory written by fl-agg backup")
    rs.add_argument("--config", required=True, help="the aggregator's config")
    kg = sub.add_parser("keygen", help="create the aggregator's keys")
    kg.add_argument("--out", required=True, type=Path)
    kg.add_argument("--force", action="store_true")
    en = sub.add_parser("enroll", help="register a device's public keys")
    en.add_argument("device_id")
    en.add_argument("pubkey_file", type=Path)
    en.add_argument("--registry", type=Path, default=Path("registry.json"))
    en.add_argument("--replace", action="store_true", help="replace the key of a device that is already enrolled")
    en.add_argument("--cert", type=Path, default=None, help="the device's certificate from fl-authority certify")
    en.add_argument("--authority", type=Path, default=None, help="authority.pub.json, to check the certificate")
    un = sub.add_parser("unenroll", help="remove a device from the registry (takes effect when the aggregator next starts)")
    un.add_argument("device_id")
    un.add_argument("--registry", type=Path, default=Path("registry.json"))
    rb = sub.add_parser("rollback", help="ask the aggregator to announce a signed rollback to a kept release")
    rb.add_argument("--config", required=True, help="the aggregator's config")
    rb.add_argument("--to", required=True, help="the kept release id to go back to (see OUT/releases)")
    rb.add_argument("--reason", default="", help="why, for the record (OUT/releases/rollbacks.jsonl)")
    bc = sub.add_parser("broker-config", help="write a Mosquitto config with TLS, passwords and ACLs")
    bc.add_argument("--out", required=True, type=Path)
    bc.add_argument("--devices", required=True, help="comma-separated device ids")
    bc.add_argument("--port", type=int, default=8883)
    bc.add_argument("--host", default="127.0.0.1")
    bc.add_argument("--no-tls", action="store_true", help="plaintext listener (NOT for real deployments)")
    bc.add_argument("--observers", default="", help="comma-separated read-only accounts (auditors)")
    bc.add_argument("--force", action="store_true", help="replace an existing config: new CA key and new passwords for everyone")
    args = ap.parse_args(argv)
    log_format.configure(args.log_level, args.log_format)
    from fl_mqtt.link import LinkError

    def body() -> int | None:
        if args.cmd == "keygen":
            keygen(args.out, args.force)
        elif args.cmd == "enroll":
            enroll(args.device_id, args.pubkey_file, args.registry, args.replace, args.cert, args.authority)
        elif args.cmd == "unenroll":
            from aggregator import registry

            gone = registry.unenroll(args.registry, args.device_id)
            log.info("removed %s (key fingerprint %s) from %s; restart the aggregator, and remove its broker account",
                     args.device_id, gone.keys.fingerprint(), args.registry)
        elif args.cmd == "broker-config":
            from aggregator.broker_config import write_broker_config

            if args.no_tls:
                log.warning("writing a broker config WITHOUT TLS: passwords and payload sizes travel in clear")
            files = write_broker_config(args.out, [d for d in args.devices.split(",") if d], tls=not args.no_tls,
                                        port=args.port, host=args.host, force=args.force,
                                        observers=[o for o in args.observers.split(",") if o])
            log.info("wrote %s; per-device credentials in %s", files.conf_path, args.out)
        elif args.cmd == "rollback":
            from aggregator.config import load
            from aggregator.release import request_rollback
            from shared.crypto import load_private_keys

            cfg = load(args.config)
            if cfg.insecure or not cfg.keys:
                raise ValueError("releases are signed with the aggregator's key; an insecure config has none")
            key = load_private_keys(cfg.keys)
            replaces = request_rollback(Path(cfg.out_dir) / "releases", args.to, args.reason, key.public, cfg.release.fleet)
            log.info("rollback from %s to %s requested: the running aggregator announces it at the next round boundary "
                     "(or when it next starts)", replaces, args.to)
        elif args.cmd == "doctor":
            from aggregator import doctor
            from aggregator.config import load

            from shared.checklist import report

            return report(doctor.run(load(args.config), broker_timeout=args.timeout))
        elif args.cmd in ("backup", "restore"):
            from aggregator import backup
            from aggregator.config import load

            out = Path(load(args.config).out_dir)
            if args.cmd == "backup":
                info = backup.backup(out, args.out)
                log.info("backed up %s at round %d to %s", out, info["round"], args.out)
            else:
                info = backup.restore(args.backup, out)
                log.info("restored %s (round %d) into %s; `fl-agg run` resumes from it", args.backup, info["round"], out)
        else:
            from aggregator import authority_guard
            from aggregator.config import load
            from aggregator.server import Aggregator

            cfg = load(args.config)
            if not cfg.insecure:
                authority_guard.warn_if_readable(cfg.authority, cfg.keys)
            try:
                Aggregator(cfg, fresh=args.fresh).run()
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
                    raise
                # A full or read-only disk in the middle of a round (a checkpoint, a model card): the
                # store's last commit is intact, and a restart resumes from it once there is room.
                from aggregator.store import StoreError

                raise StoreError(f"{e.filename or cfg.out_dir}: {e.strerror}: the aggregator stopped; its store keeps the "
                                 "last committed round, and `fl-agg run` resumes from it once the disk has room") from None

    return cli.run(body, log, debug=args.debug, extra=(LinkError,))


if __name__ == "__main__":
    sys.exit(main())
