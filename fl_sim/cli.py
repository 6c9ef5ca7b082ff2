"""``fl-sim``: the one-machine simulation: broker, aggregator and N edge clients as processes."""

from __future__ import annotations

import argparse
import logging
import sys

from fl_sim import real_pair
from fl_sim.run import SimSettings, simulate
from shared import cli
from shared.cli import add_debug
from shared.config import from_dict


def _sized(d: SimSettings, field: str) -> str:
    """A help text's default for a setting a real student sizes differently (fl_sim.real_pair)."""
    return f"(default {getattr(d, field)}; {real_pair.REAL_SIZING[field]} for a real student)"


def parse(argv: list[str] | None) -> SimSettings:
    d = SimSettings()
    ap = argparse.ArgumentParser(prog="fl-sim", description=__doc__)
    ap.add_argument("--devices", type=int, default=d.devices)
    # default None: a setting the command line leaves alone may be sized for a real student (fl_sim.real_pair)
    ap.add_argument("--rounds", type=int, default=None, help=_sized(d, "rounds"))
    ap.add_argument("--out", default=d.out, help="output directory (metrics.jsonl, report.md, metrics.png)")
    ap.add_argument("--broker", default=None, help="use this broker (mqtt://HOST:PORT) instead of the embedded one")
    ap.add_argument("--broker-mode", choices=("embedded", "mosquitto"), default=d.broker_mode,
                    help="without --broker: embedded amqtt (no TLS) or a Mosquitto started with TLS, passwords and ACLs")
    ap.add_argument("--insecure", action="store_true", help="turn OFF end-to-end encryption and signatures (debug only)")
    ap.add_argument("--data", default=None, help="your JSONL/text: a directory with one file per device, or one file split across "
                    f"devices; without --student/--teacher, the real pair where `{real_pair.MAKE_TARGET}` installed it "
                    f"({real_pair.ENV}=DIR: elsewhere)")
    ap.add_argument("--encoding", default=None, help="text encoding of the --data files when not UTF-8 (latin-1, cp1252, ...)")
    ap.add_argument("--mode", choices=("fedkd", "fl-minillm", "fedit"), default=d.mode,
                    help="fedkd (default): FedAvg, then teacher<->student distillation on the aggregator's public set; "
                         "fl-minillm: FedAvg, then sequence-level distillation with the roles alternating (the fleet "
                         "teaches the teacher under secure aggregation, then the teacher the student); fedit: FedAvg only")
    ap.add_argument("--minillm-steps", type=int, default=None,
                    help=f"MiniLLM updates per round (fl-minillm) {_sized(d, 'minillm_steps')}")
    ap.add_argument("--minillm-roles", default=",".join(d.minillm_roles),
                    help="fl-minillm: comma-separated roles cycled over the rounds (client = the fleet teaches)")
    ap.add_argument("--teacher", default=None, help="teacher id or path; default: the offline teacher built with the student")
    ap.add_argument("--teacher-tokenizer", choices=("same", "metaspace"), default=d.teacher_tokenizer,
                    help="offline teacher: the student's tokenizer, or a different one (aligned with MinED + DTW)")
    ap.add_argument("--teacher-pretrain-steps", type=int, default=None)
    ap.add_argument("--distil-steps", type=int, default=None,
                    help=f"distillation steps per round and direction (fedkd) {_sized(d, 'distil_steps')}")
    ap.add_argument("--distil-lr", type=float, default=d.distil_lr, help="teacher->student distillation learning rate (fedkd)")
    ap.add_argument("--teacher-lr", type=float, default=d.teacher_lr, help="student->teacher distillation learning rate (fedkd)")
    ap.add_argument("--kd-loss", choices=("forward_kl", "reverse_kl", "jsd"), default=d.kd_loss)
    ap.add_argument("--lora-r", type=int, default=d.lora_r)
    ap.add_argument("--server-optimizer", choices=("fedavg", "fedavgm", "fedadam"), default=d.server_optimizer)
    ap.add_argument("--server-lr", type=float, default=d.server_lr)
    ap.add_argument("--public-data", default=None, help="with --data DIR: the aggregator's public set (JSONL/text file or directory)")
    ap.add_argument("--eval-data", default=None, help="with --data DIR: held-out examples (a file, or a directory with a file per family)")
    ap.add_argument("--public-eval-data", default=None, help="held-out public examples, scored beside --eval-data")
    ap.add_argument("--local-steps", type=int, default=None, help=_sized(d, "local_steps"))
    ap.add_argument("--learning-rate", type=float, default=d.learning_rate)
    ap.add_argument("--quorum", type=int, default=None, help="fewest updates for a round to count (default: most of the devices)")
    ap.add_argument("--round-timeout", type=float, default=None, help=_sized(d, "round_timeout_s"))
    ap.add_argument("--split", choices=("dirichlet", "family"), default=d.split)
    ap.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet concentration for the non-IID split")
    ap.add_argument("--examples-per-family", type=int, default=d.examples_per_family)
    ap.add_argument("--eval-per-family", type=int, default=None, help=_sized(d, "eval_per_family"))
    ap.add_argument("--student", default=None, help="student base id or path; default: build the offline models (with --data: "
                    "the real pair, where installed)")
    ap.add_argument("--profile", default=None, help=f"every simulated device's profile (firmware_profiles/) {_sized(d, 'profile')}")
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help=f"the aggregator's evaluation and distillation length {_sized(d, 'max_seq_len')}")
    ap.add_argument("--release-int8", action="store_true",
                    help="the ONNX release with int8 weights (parity gate: 90%% next-token agreement, loss within 5%%)")
    ap.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--secagg", action=argparse.BooleanOptionalAction, default=d.secagg,
                    help="secure aggregation (default on): the aggregator learns only the sum of the updates")
    ap.add_argument("--density", type=float, default=d.density, help="fraction of adapter coordinates sent per round (1.0 = dense)")
    ap.add_argument("--sparse-method", choices=("topk", "random", "device_topk"), default=d.sparse_method,
                    help="seeded random-k (default), shared global top-k, or per-device top-k (needs --no-secagg)")
    ap.add_argument("--value-bits", type=int, default=d.value_bits,
                    help="bits of resolution per sent value (0 = finest; the masked ring adds ceil(log2 n) bits)")
    ap.add_argument("--clip", type=float, default=d.clip, help="per-coordinate clip of sent values (the rest is kept for later rounds)")
    ap.add_argument("--keep-sent", action="store_true", help="devices keep a plaintext copy of each contribution (audit)")
    ap.add_argument("--keep-received", action="store_true", help="store every received update's bytes (debug/audit)")
    ap.add_argument("--data-only", action="store_true",
                    help="write the run's data (a shard per device, held-out and public sets) under OUT/data/ and stop: "
                         "synthetic trial data for a real deployment (docs/DEPLOY.md)")
    ap.add_argument("--log-level", default="INFO")
    add_debug(ap)
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level, format="%(asctime)s fl-sim %(message)s", datefmt="%H:%M:%S")
    vals = {k: v for k, v in vars(a).items() if k not in ("log_level", "debug", "data_only") and v is not None}
    for flag in ("insecure", "release_int8"):
        if not vals.get(flag):
            vals.pop(flag, None)
    if "round_timeout" in vals:
        vals["round_timeout_s"] = vals.pop("round_timeout")
    vals["minillm_roles"] = tuple(r.strip() for r in vals["minillm_roles"].split(",") if r.strip())
    return real_pair.choose(from_dict(SimSettings, vals, "fl-sim"), given=set(vals))


def main(argv: list[str] | None = None) -> int:
    log = logging.getLogger("fl-sim")
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)

    def body() -> None:
        args = list(sys.argv[1:] if argv is None else argv)
        if "--data-only" in args:
            from pathlib import Path

            from fl_sim.run import prepare_data

            s = parse(args)
            data, paths = prepare_data(s, Path(s.out))
            log.info("wrote %d device shards (%s examples), held-out sets in %s, the public set %s (%d examples)",
                     len(paths.shards), [len(x) for x in data.shards], paths.eval_dir, paths.public, len(data.public))
            return
        report = simulate(parse(argv))
        log.info("report: %s", report)

    # RuntimeError: a process of the simulation failed; its log is named in the message.
    return cli.run(body, log, debug=debug, extra=(RuntimeError,))


if __name__ == "__main__":
    sys.exit(main())
