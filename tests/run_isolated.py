"""Check that the tests do not depend on their order: each module alone, then the suite reversed.

    .venv/bin/python tests/run_isolated.py                     # every module alone, then reversed
    .venv/bin/python tests/run_isolated.py --skip-suite        # modules alone only
    .venv/bin/python tests/run_isolated.py --order shuffle:7 tests/aggregator tests/shared
    .venv/bin/python tests/run_isolated.py --exclude tests/test_secure_rounds.py -- -x

Each module runs in a pytest process of its own with the default markers (pyproject's addopts),
one at a time (the suite is meant to pass on a 2-core box, and parallel runs would hide nothing).
Then the selected modules run together in one process with ``--test-order`` (``tests/conftest.py``;
reverse by default). A module whose tests are all deselected by the default markers counts as
empty, not failed. Prints one line per run as it finishes and a summary with the times; exits 1
when any run failed. ``make test-order`` runs it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_TESTS = 5  # pytest's exit status when nothing was collected or everything was deselected


@dataclass
class Run:
    name: str
    rc: int
    seconds: float
    last_line: str

    @property
    def verdict(self) -> str:
        return "ok" if self.rc == 0 else "empty" if self.rc == NO_TESTS else "FAILED"


def modules(paths: list[str], exclude: list[str]) -> list[str]:
    """Test modules under ``paths`` (files or directories, relative to the repository), sorted."""
    found: list[Path] = []
    for p in paths or ["tests"]:
        path = (ROOT / p).resolve()
        found += [path] if path.is_file() else sorted(path.rglob("test_*.py"))
    rel = sorted({str(f.relative_to(ROOT)) for f in found})
    return [m for m in rel if not any(fnmatch(m, pat) or m.startswith(pat.rstrip("/") + "/") for pat in exclude)]


def run(name: str, args: list[str], timeout_s: float) -> Run:
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=timeout_s)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, out = 124, f"{partial}\ntimed out after {timeout_s:.0f} s"
    lines = [line for line in out.splitlines() if line.strip()]
    r = Run(name, rc, time.monotonic() - t0, lines[-1] if lines else "")
    print(f"{r.verdict:>6}  {r.seconds:7.1f} s  {name}  ({r.last_line})", flush=True)
    if r.verdict == "FAILED":
        failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        print("\n".join(f"          {line}" for line in failed or lines[-20:]), flush=True)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", help="test files or directories (default: tests)")
    ap.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                    help="leave out modules matching GLOB (a path or directory, relative to the repository)")
    ap.add_argument("--order", default="reverse", help="--test-order for the whole-suite run (default: reverse)")
    ap.add_argument("--skip-alone", action="store_true", help="do not run each module alone")
    ap.add_argument("--skip-suite", action="store_true", help="do not run the modules together in --order")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per pytest process (default: 1800)")
    a, extra = ap.parse_known_args(argv)
    extra = [x for x in extra if x != "--"]
    mods = modules(a.paths, a.exclude)
    if not mods:
        print("no test modules selected", file=sys.stderr)
        return 2
    runs: list[Run] = []
    t0 = time.monotonic()
    if not a.skip_alone:
        print(f"each of {len(mods)} modules alone:", flush=True)
        runs += [run(m, [m, *extra], a.timeout) for m in mods]
    if not a.skip_suite:
        print(f"the {len(mods)} modules together, --test-order {a.order}:", flush=True)
        whole = [str(p) for p in a.paths] or ["tests"]
        ignored = [f"--ignore={m}" for m in modules(a.paths, []) if m not in mods]
        runs.append(run(f"suite, --test-order {a.order}", [*whole, *ignored, f"--test-order={a.order}", *extra],
                        a.timeout * max(1, len(mods))))
    bad = [r for r in runs if r.verdict == "FAILED"]
    print(f"\n{len(runs)} runs in {time.monotonic() - t0:.0f} s: {len(runs) - len(bad)} ok or empty, {len(bad)} failed")
    for r in sorted(runs, key=lambda r: -r.seconds)[:10]:
        print(f"  {r.seconds:7.1f} s  {r.verdict:>6}  {r.name}")
    for r in bad:
        print(f"FAILED  {r.name}: {r.last_line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
