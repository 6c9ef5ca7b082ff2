"""The verdict lines of ``fl-edge doctor`` and ``fl-agg doctor``: one check, one line, one verdict.

Both sides need the same shape (edge_client and aggregator never import each other), so it
lives in the protocol package, which imports nothing heavy.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

OK, WARN, FAIL = "ok", "WARN", "FAIL"


@dataclass(frozen=True)
class Check:
    name: str
    verdict: str  # OK, WARN (works, not as planned) or FAIL (cannot take part until fixed)
    detail: str

    def line(self) -> str:
        return f"[{self.verdict:>4}] {self.name}: {self.detail}"


def guarded(out: list[Check], name: str, fn: Callable[[], Check]) -> None:
    """Run one check into ``out``; a check that raises is its own FAIL line, never a traceback."""
    try:
        out.append(fn())
    except Exception as e:  # noqa: BLE001 - one line per check
        out.append(Check(name, FAIL, f"{type(e).__name__}: {e}"))


def report(checks: list[Check], stream: TextIO | None = None) -> int:
    """Print every line and a summary; 1 when any check failed, else 0."""
    stream = stream or sys.stdout
    for c in checks:
        stream.write(c.line() + "\n")
    failed = [c.name for c in checks if c.verdict == FAIL]
    stream.write(f"{len(checks)} checks, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else "") + "\n")
    return 1 if failed else 0
