"""``fl-agg``: run the aggregator service."""

from __future__ import annotations

import argparse
import logging
import sys

from shared.errors import ConfigError, ProtocolError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fl-agg", description="FL-MiniLLM aggregator")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run federated rounds")
    run.add_argument("--config", required=True, help="aggregator config (.json or .toml)")
    run.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.cmd == "run":
        from aggregator.config import load
        from aggregator.server import Aggregator
        from fl_mqtt.link import LinkError

        try:
            Aggregator(load(args.config)).run()
        except (ConfigError, ProtocolError, LinkError) as e:
            logging.getLogger("fl-agg").error("%s", e)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
