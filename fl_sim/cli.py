"""``fl-sim``: the one-machine simulation: broker, aggregator and N edge clients as processes."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fl_sim.run import SimSettings, simulate
from shared.config import from_dict
from shared.errors import ConfigError


def parse(argv: list[str] | None) -> SimSettings:
    d = SimSettings()
    ap = argparse.ArgumentParser(prog="fl-sim", description=__doc__)
    ap.add_argument("--devices", type=int, default=d.devices)
    ap.add_argument("--rounds", type=int, default=d.rounds)
    ap.add_argument("--out", default=d.out, help="output directory (metrics.jsonl, report.md, metrics.png)")
    ap.add_argument("--broker", default=None, help="use this broker (mqtt://HOST:PORT) instead of the embedded one")
    ap.add_argument("--data", default=None, help="your JSONL/text: a directory with one file per device, or one file split across devices")
    ap.add_argument("--local-steps", type=int, default=d.local_steps)
    ap.add_argument("--learning-rate", type=float, default=d.learning_rate)
    ap.add_argument("--quorum", type=int, default=None, help="fewest updates for a round to count (default: most of the devices)")
    ap.add_argument("--round-timeout", type=float, default=d.round_timeout_s)
    ap.add_argument("--split", choices=("dirichlet", "family"), default=d.split)
    ap.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet concentration for the non-IID split")
    ap.add_argument("--examples-per-family", type=int, default=d.examples_per_family)
    ap.add_argument("--eval-per-family", type=int, default=d.eval_per_family)
    ap.add_argument("--student", default=None, help="student base id or path; default: build the offline models")
    ap.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--keep-received", action="store_true", help="store every received update's bytes (debug/audit)")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level, format="%(asctime)s fl-sim %(message)s", datefmt="%H:%M:%S")
    vals = {k: v for k, v in vars(a).items() if k != "log_level" and v is not None}
    vals["round_timeout_s"] = vals.pop("round_timeout")
    return from_dict(SimSettings, vals, "fl-sim")


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse(argv)
        report = simulate(settings)
    except (ConfigError, ValueError, RuntimeError) as e:
        logging.getLogger("fl-sim").error("%s", e)
        return 2
    logging.getLogger("fl-sim").info("report: %s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
