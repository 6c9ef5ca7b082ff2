"""``fl-edge``: run a device."""

from __future__ import annotations

import argparse
import logging
import sys

from shared.errors import ConfigError, ProtocolError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fl-edge", description="FL-MiniLLM edge client")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="connect to the broker and take part in rounds")
    run.add_argument("--config", required=True, help="device config (.json or .toml)")
    run.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.cmd == "run":
        from edge_client.client import EdgeClient
        from edge_client.config import load
        from fl_mqtt.link import LinkError

        try:
            EdgeClient(load(args.config)).run()
        except (ConfigError, ProtocolError, LinkError) as e:
            logging.getLogger("fl-edge").error("%s", e)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
