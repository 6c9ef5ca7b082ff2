"""Start real brokers for tests: Mosquitto on a free loopback port with a config we write.

Mosquitto must be installed (``.ci/run`` installs the ``mosquitto`` apt package where missing).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def mosquitto_binary() -> str:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if cand and Path(cand).exists():
            return cand
    raise RuntimeError("mosquitto not found: install the 'mosquitto' apt package")


@dataclass
class Mosquitto:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_mosquitto(workdir: Path, body: str = "allow_anonymous true\n", port: int | None = None) -> Mosquitto:
    """Start Mosquitto with ``listener PORT 127.0.0.1`` followed by ``body`` as its config.

    ``body`` may reference files (passwords, ACLs, certificates) already written under ``workdir``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = workdir / "mosquitto.conf"
    log_path = workdir / "mosquitto.log"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "persistence false\n"
        f"log_dest file {log_path}\n"
        "log_type all\n" + body
    )
    proc = subprocess.Popen(
        [mosquitto_binary(), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port)
    except TimeoutError:
        proc.kill()
        _, err = proc.communicate()
        raise RuntimeError(
            f"mosquitto did not start: {err.decode(errors='replace')}\n{log_path.read_text() if log_path.exists() else ''}"
        ) from None
    return Mosquitto(port=port, proc=proc, log_path=log_path)
