"""The embedded broker for the one-machine default: amqtt (MQTT 3.1.1) on a loopback port.

Run as ``python -m fl_sim.broker --port P``; the simulation starts it as a child process. It is
for a single machine only: no TLS and anonymous access, and it says so loudly. Use
``--broker`` or ``--broker-mode mosquitto`` for anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

log = logging.getLogger(__name__)


def broker_config(port: int) -> dict:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 1000}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


async def _serve(port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker(broker_config(port))
    await broker.start()
    log.warning("embedded amqtt broker on 127.0.0.1:%d: NO TLS, anonymous access (one-machine simulation only)", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s broker %(levelname)s %(message)s")
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)  # port probes log as errors
    asyncio.run(_serve(args.port))


if __name__ == "__main__":
    main()
