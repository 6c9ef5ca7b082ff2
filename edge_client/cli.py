"""``fl-edge``: run a device, or make its keys."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from shared import cli
from shared.cli import add_debug
from shared.errors import ConfigError

log = logging.getLogger("fl-edge")


def keygen(out: Path, force: bool) -> None:
    """Write ``device.key`` (private, 0600) and ``device.pub.json`` (give it to the aggregator)."""
    from shared.crypto import write_keypair

    priv, pub = write_keypair(out, "device", overwrite=force)
    log.info("wrote %s (private, 0600) and %s; enroll with: fl-agg enroll DEVICE_ID %s", priv, pub, pub)


def generate(args: argparse.Namespace) -> None:
    """Verify the current release (signature, fleet, every digest), load it, answer, print JSON."""
    import json

    from edge_client.config import load
    from edge_client.releases import ReleaseStore
    from edge_client.serve import Server
    from fl_lm.onnx_session import Sampling
    from shared.crypto import load_public_keys
    from shared.profiles import load_profile

    cfg = load(args.config)
    if cfg.aggregator_keys is None:
        raise ConfigError("generate needs aggregator_keys in the config: releases are verified before use")
    profile = load_profile(cfg.profile)
    store = ReleaseStore(cfg.releases_dir or Path(cfg.work_dir) / "releases", load_public_keys(cfg.aggregator_keys), cfg.fleet)
    server = Server(store, providers=profile.ort_providers, threads=profile.torch_threads)
    s = Sampling(max_new_tokens=args.max_new_tokens, greedy=not args.sample, temperature=args.temperature,
                 top_p=args.top_p, seed=args.seed)
    if args.instruction is not None:
        out = server.instruct(args.instruction, args.input, s)
    else:
        out = server.generate(args.prompt, s)
    sys.stdout.write(json.dumps(out) + "\n")


def plan(args: argparse.Namespace) -> None:
    """The memory plan of a model on a profile: text (stderr log) and JSON (stdout), nothing loaded."""
    import json

    from edge_client import environment, planner
    from fl_lm.loading import check_model_source
    from shared.messages import LoraSpec
    from shared.profiles import load_profile

    profile = load_profile(args.profile)
    check_model_source(args.model, "--model")
    shape = planner.shape_of(args.model)
    targets = tuple(t for t in args.targets.split(",") if t)
    lora = LoraSpec(r=args.rank, alpha=2.0 * args.rank, dropout=0.0, target_modules=targets)
    if args.rank > profile.max_lora_rank:
        raise ConfigError(f"--rank {args.rank}: profile {profile.name} allows at most {profile.max_lora_rank}")
    p = planner.plan(profile, shape, lora)
    for w in environment.check(profile):
        log.warning("%s", w)
    log.info("%s params (%s in quantizable linear layers), LoRA %s params\n%s", f"{shape.params:,}",
             f"{shape.linear_params:,}", f"{shape.lora_params(lora):,}", p.text())
    sys.stdout.write(json.dumps({**p.to_json(), "model": args.model, "params": shape.params}, indent=2) + "\n")


def doctor(args: argparse.Namespace) -> int:
    """Print the checklist (edge_client.doctor); 1 when any check fails."""
    from edge_client import doctor as dr
    from edge_client.config import load

    from shared.checklist import report

    return report(dr.run(load(args.config), broker_timeout=args.timeout, login=args.login))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fl-edge", description="FL-MiniLLM edge client")
    ap.add_argument("--log-level", default="INFO")
    add_debug(ap)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="connect to the broker and take part in rounds")
    run.add_argument("--config", required=True, help="device config (.json or .toml)")
    run.add_argument("--profile", default=None, help="device profile name or file (overrides the config's)")
    run.add_argument("--data", default=None, help="the private examples (overrides the config's data)")
    gen = sub.add_parser("generate", help="answer a prompt from the current ONNX release (onnxruntime)")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("prompt", nargs="?", help="the text to continue, as it is")
    what.add_argument("--instruction", help="an instruction, formatted as training formatted them (the chat template "
                                            "where the release's tokenizer has one, else the Alpaca template)")
    gen.add_argument("--input", default="", help="with --instruction: its input (context)")
    gen.add_argument("--config", required=True, help="device config: keys, fleet and where releases are installed")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    pl = sub.add_parser("plan", help="the memory plan of a model on a device profile (loads nothing)")
    pl.add_argument("--profile", required=True, help="firmware_profiles/NAME.toml, or a path")
    pl.add_argument("--model", required=True, help="model id or path (its config is read, not its weights)")
    pl.add_argument("--rank", type=int, default=16, help="LoRA rank the rounds ask for")
    pl.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                    help="comma-separated LoRA target modules")
    dr = sub.add_parser("doctor", help="a checklist of why this device would not join (exit 1 on any failure)")
    dr.add_argument("--config", required=True, help="device config (.json or .toml)")
    dr.add_argument("--login", action="store_true", help="also log in to the broker as the device (only with the device's "
                                                         "client stopped: the broker keeps one session per account)")
    dr.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker")
    kg = sub.add_parser("keygen", help="create this device's signing and encryption keys")
    kg.add_argument("--out", required=True, type=Path, help="directory for device.key and device.pub.json")
    kg.add_argument("--force", action="store_true", help="overwrite an existing private key")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from fl_mqtt.link import LinkError

    def body() -> int | None:
        if args.cmd == "keygen":
            keygen(args.out, args.force)
        elif args.cmd == "generate":
            generate(args)
        elif args.cmd == "plan":
            plan(args)
        elif args.cmd == "doctor":
            return doctor(args)
        else:
            from dataclasses import replace

            from edge_client.client import EdgeClient
            from edge_client.config import load
            from fl_lm.memory import return_freed_memory

            # Before the model loads: the device's memory then follows what training holds
            # (the planner's prediction), not the high-water mark of load-time temporaries.
            return_freed_memory()
            cfg = load(args.config)
            cfg = replace(cfg, **{k: v for k, v in (("profile", args.profile), ("data", args.data)) if v is not None})
            EdgeClient(cfg).run()

    return cli.run(body, log, debug=args.debug, extra=(LinkError,))


if __name__ == "__main__":
    sys.exit(main())
