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
    sys.stdout.write(json.dumps(server.generate(args.prompt, s)) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fl-edge", description="FL-MiniLLM edge client")
    ap.add_argument("--log-level", default="INFO")
    add_debug(ap)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="connect to the broker and take part in rounds")
    run.add_argument("--config", required=True, help="device config (.json or .toml)")
    gen = sub.add_parser("generate", help="answer a prompt from the current ONNX release (onnxruntime)")
    gen.add_argument("prompt")
    gen.add_argument("--config", required=True, help="device config: keys, fleet and where releases are installed")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    kg = sub.add_parser("keygen", help="create this device's signing and encryption keys")
    kg.add_argument("--out", required=True, type=Path, help="directory for device.key and device.pub.json")
    kg.add_argument("--force", action="store_true", help="overwrite an existing private key")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from fl_mqtt.link import LinkError

    def body() -> None:
        if args.cmd == "keygen":
            keygen(args.out, args.force)
        elif args.cmd == "generate":
            generate(args)
        else:
            from edge_client.client import EdgeClient
            from edge_client.config import load

            EdgeClient(load(args.config)).run()

    return cli.run(body, log, debug=args.debug, extra=(LinkError,))


if __name__ == "__main__":
    sys.exit(main())
