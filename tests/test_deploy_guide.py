"""docs/DEPLOY.md cannot drift from the code (issue 26).

The guide's shell blocks are run verbatim, in step order, with each machine (the offline
authority, the aggregator, two devices) mapped to a temporary home directory: `scp host:path` is
a copy between those directories, Mosquitto runs on a free loopback port with the config the
guide writes, and the devices train the small offline models, until a round completes and both
devices hold its release. Blocks marked `install` (apt, pip, NVIDIA's wheel) are only parsed: the
project's own `.venv` stands in for them. The fast tests check the guide's shape and the systemd
units it points to.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "DEPLOY.md"
MACHINES = ("aggregator", "authority", "device")
DEVICES = ("jetson-01", "jetson-02")
FENCE = re.compile(r"^```sh (\S+) ?([^\n]*)\n(.*?)^```$", re.M | re.S)
HEADING = re.compile(r"^### (.*)$", re.M)


@dataclass(frozen=True)
class Block:
    machine: str
    step: int  # 0 for the env blocks, which the test replaces with its own mapping
    flags: frozenset[str]
    text: str
    heading: str


def guide_blocks() -> list[Block]:
    text = GUIDE.read_text()
    heads = [(m.start(), m.group(1)) for m in HEADING.finditer(text)]
    out = []
    for m in FENCE.finditer(text):
        machine, rest, body = m.group(1), m.group(2).split(), m.group(3)
        step = next((int(w.split("=", 1)[1]) for w in rest if w.startswith("step=")), 0)
        flags = frozenset(w for w in rest if not w.startswith("step="))
        heading = next((h for pos, h in reversed(heads) if pos < m.start()), "")
        out.append(Block(machine, step, flags, body, heading))
    return out


def test_every_block_names_its_machine_and_step_and_parses() -> None:
    blocks = guide_blocks()
    assert len(blocks) >= 15, "the guide lost its blocks"
    for b in blocks:
        if "env" in b.flags:
            assert b.machine in ("operator", "device") and b.step == 0, b
            continue
        assert b.machine in MACHINES and b.step > 0, b
        # The prose above the block names the same step and machine, so a reader and the test agree.
        assert f"Step {b.step} (" in b.heading and b.machine in b.heading, (b.step, b.machine, b.heading)
        r = subprocess.run(["bash", "-n"], input=b.text, capture_output=True, text=True)
        assert r.returncode == 0, (b.step, b.machine, r.stderr)
    steps = sorted({b.step for b in blocks if b.step})
    assert steps == list(range(1, steps[-1] + 1)), f"steps are not 1..N without gaps: {steps}"
    order = re.search(r"in the order of the step numbers \(([^)]*)\)", GUIDE.read_text())
    assert order, "the guide's opening states the order of the steps"
    for part in order.group(1).split(", "):  # "steps 1-6 operator", "7-8 device", "16 device", ...
        nums, who = re.match(r"(?:steps )?([\d-]+) (\w+)", part).groups()  # type: ignore[union-attr]
        lo, _, hi = nums.partition("-")
        for n in range(int(lo), int(hi or lo) + 1):
            machines = {b.machine for b in blocks if b.step == n}
            assert machines <= ({"aggregator", "authority"} if who == "operator" else {"device"}), (n, who, machines)


def test_the_guide_and_the_readme_link_each_other() -> None:
    readme = (ROOT / "README.md").read_text()
    top = readme[: readme.index("\n## ")]
    assert "docs/DEPLOY.md" in top, "the README links the deployment guides from its top"


UNITS = sorted((ROOT / "deploy").glob("*.service"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_the_systemd_units_verify(unit: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify` with the unit's programs pointed at this checkout's (the only thing
    it cannot find here is the production venv), and every path it names is one the guide writes."""
    text = unit.read_text()
    guide = GUIDE.read_text()
    for path in (p.rstrip(".") for p in re.findall(r"/home/fl/(fl/[\w./-]+)", text)):
        assert path.rstrip("/") in guide.replace("~/", "").replace("$HOME/", ""), f"{unit.name} names {path}, the guide never writes it"
    venv = Path(sys.executable).parent
    local = tmp_path / unit.name
    local.write_text(text.replace("/home/fl/venv/bin", str(venv)))
    r = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if unit.name in ln or "Unknown" in ln]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


# --------------------------------------------------------------------------------------- verbatim run

SCP = r'''#!/usr/bin/env python3
"""scp between the test's machines: [user@]HOST:PATH is MACHINES/HOST/PATH (PATH relative to that home)."""
import glob, os, shutil, sys
root = os.environ["FL_TEST_MACHINES"]
args = [a for a in sys.argv[1:] if a not in ("-r", "-p", "-q")]
def local(a):
    if ":" in a and not a.startswith("/"):
        host, path = a.split(":", 1)
        host = host.split("@")[-1]
        base = os.path.join(root, host)
        if not os.path.isdir(base):
            sys.exit(f"scp: {host}: no such host")
        return os.path.join(base, path[2:] if path.startswith("~/") else path)
    return a
*srcs, dst = [local(a) for a in args]
files = [f for s in srcs for f in (sorted(glob.glob(s)) or [s])]
for f in files:
    if not os.path.exists(f):
        sys.exit(f"scp: {f}: No such file or directory")
    if not os.path.isdir(os.path.dirname(os.path.abspath(dst)) or "."):
        sys.exit(f"scp: {dst}: No such file or directory")
    to = os.path.join(dst, os.path.basename(f.rstrip("/"))) if os.path.isdir(dst) else dst
    if os.path.isdir(f):
        if "-r" not in sys.argv:
            sys.exit(f"scp: {f}: not a regular file")
        shutil.copytree(f, to, dirs_exist_ok=True)
    else:
        shutil.copyfile(f, to)
        os.chmod(to, os.stat(f).st_mode & 0o777)
'''


class Machines:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.bin = root / ".bin"
        self.bin.mkdir(parents=True)
        (self.bin / "scp").write_text(SCP)
        (self.bin / "scp").chmod(0o755)
        for m in ("aggregator", "authority", *DEVICES):
            (root / m).mkdir()
        self.services: list[tuple[str, subprocess.Popen]] = []

    def env(self, machine: str) -> dict[str, str]:
        venv = Path(sys.executable).parent
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FL_", "VIRTUAL_ENV"))}
        env |= {"HOME": str(self.root / machine), "PATH": f"{self.bin}:{venv}:/usr/sbin:/usr/bin:/bin",
                "FL_TEST_MACHINES": str(self.root), "FLEET_HOST": "127.0.0.1", "BROKER_PORT": str(self.port),
                "DEVICES": ",".join(DEVICES), "PROFILE": "cpu-dev", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if machine in DEVICES:
            env["DEVICE_ID"] = machine
        return env

    def run(self, machine: str, b: Block, timeout: float) -> str:
        log = self.root / f"step{b.step:02d}-{machine}.log"
        with log.open("w") as f:
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", b.text], cwd=self.root / machine, env=self.env(machine),
                               stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        out = log.read_text()
        assert r.returncode == 0, f"step {b.step} on {machine} exited {r.returncode}:\n{b.text}\n--- output ---\n{out[-6000:]}"
        return out

    def start(self, machine: str, b: Block) -> None:
        log = (self.root / f"step{b.step:02d}-{machine}.log").open("w")
        p = subprocess.Popen(["bash", "-euo", "pipefail", "-c", b.text], cwd=self.root / machine, env=self.env(machine),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.services.append((f"step {b.step} on {machine}", p))
        time.sleep(3)
        assert p.poll() is None, f"step {b.step} on {machine} exited at once:\n{(self.root / f'step{b.step:02d}-{machine}.log').read_text()[-4000:]}"

    def stop(self) -> None:
        for _, p in reversed(self.services):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for _, p in self.services:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_walkthroughs_run_verbatim_until_both_devices_hold_the_release(tmp_path: Path) -> None:
    from tests.brokers import free_port, mosquitto_binary, wait_for_port

    assert Path(mosquitto_binary()).exists()
    port = free_port()
    ms = Machines(tmp_path, port)
    outputs: dict[tuple[int, str], str] = {}
    try:
        for b in sorted((b for b in guide_blocks() if b.step and not b.flags & {"install", "env"}), key=lambda b: b.step):
            for machine in (DEVICES if b.machine == "device" else (b.machine,)):
                if "service" in b.flags:
                    ms.start(machine, b)
                    if b.step == 6:
                        wait_for_port(port)
                else:
                    outputs[(b.step, machine)] = ms.run(machine, b, timeout=1200)
    finally:
        ms.stop()
    # Both devices hold the round's release, verified by their own doctor, and answer from it.
    for dev in DEVICES:
        doctor = outputs[(16, dev)]
        assert re.search(r"\[  ok\] release: \S+ \(round 1, ", doctor), doctor
        assert "0 failed" in doctor
        answer = json.loads(doctor.strip().splitlines()[-1])  # fl-edge generate's line, after the checklist
        assert answer["release_id"] and answer["text"].strip(), answer
        releases = tmp_path / dev / "fl" / "state" / "releases"
        assert releases.is_dir()
    agg = tmp_path / "aggregator" / "fl"
    records = [json.loads(x) for x in (agg / "out" / "metrics.jsonl").read_text().splitlines()]
    done = [r for r in records if r["round"] == 1]
    assert len(done) == 1 and done[0]["status"] == "ok" and sorted(done[0]["received"]) == list(DEVICES), done
    assert sorted(p.name for p in (tmp_path / "aggregator" / "backups").iterdir()), "the backup step wrote nothing"
    reg = (agg / "registry.json").read_text()
    assert "jetson-01" in reg and "jetson-02" not in reg  # step 18 removed it
    assert not any(line.startswith("jetson-02:") for line in (agg / "broker" / "passwd").read_text().splitlines())
