"""``fl-edge``: run a device, or make its keys."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from shared import cli
from shared.cli import add_debug

log = logging.getLogger("fl-edge")


def keygen(out: Path, force: bool) -> None:
    """Write ``device.key`` (private, 0600) and ``device.pub.json`` (give it to the aggregator)."""
    from shared.crypto import write_keypair

    priv, pub = write_keypair(out, "device", overwrite=force)
    log.info("wrote %s (private, 0600) and %s; enroll with: fl-agg enroll DEVICE_ID %s", priv, pub, pub)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fl-edge", description="FL-MiniLLM edge client")
    ap.add_argument("--log-level", default="INFO")
    add_debug(ap)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="connect to the broker and take part in rounds")
    run.add_argument("--config", required=True, help="device config (.json or .toml)")
    kg = sub.add_parser("keygen", help="create this device's signing and encryption keys")
    kg.add_argument("--out", required=True, type=Path, help="directory for device.key and device.pub.json")
    kg.add_argument("--force", action="store_true", help="overwrite an existing private key")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from fl_mqtt.link import LinkError

    def body() -> None:
        if args.cmd == "keygen":
            keygen(args.out, args.force)
        else:
            from edge_client.client import EdgeClient
            from edge_client.config import load

            EdgeClient(load(args.config)).run()

    return cli.run(body, log, debug=args.debug, extra=(LinkError,))


if __name__ == "__main__":
    sys.exit(main())
