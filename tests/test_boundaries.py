"""Package boundaries: shared stays light; edge_client and aggregator never import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(pkg: str) -> set[str]:
    names: set[str] = set()
    for f in (ROOT / pkg).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(("pkg", "forbidden"), [
    ("shared", {"torch", "paho", "onnxruntime", "transformers", "peft", "edge_client", "aggregator", "fl_lm", "fl_mqtt", "fl_sim"}),
    ("edge_client", {"aggregator", "fl_sim"}),
    ("aggregator", {"edge_client", "fl_sim"}),
    ("fl_lm", {"edge_client", "aggregator", "fl_sim", "paho"}),
    ("fl_mqtt", {"edge_client", "aggregator", "fl_sim", "torch"}),
])
def test_package_does_not_import(pkg: str, forbidden: set[str]) -> None:
    bad = _imports(pkg) & forbidden
    assert not bad, f"{pkg} imports {sorted(bad)}"


def test_importing_all_of_shared_loads_no_heavy_stack() -> None:
    mods = sorted(f"shared.{p.relative_to(ROOT / 'shared').with_suffix('').as_posix().replace('/', '.')}"
                  for p in (ROOT / "shared").rglob("*.py") if p.name != "__init__.py")
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods) +
            "bad=[m for m in ('torch','paho','onnxruntime','transformers','peft') if m in sys.modules]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing shared loaded {out.stdout.strip()}"
    assert len(mods) >= 5


def test_only_one_private_module_touches_cryptography() -> None:
    """Crypto recipes live in shared/_hazmat.py so an audit reads one file (STYLE: one private module)."""
    users = []
    for pkg in ("shared", "edge_client", "aggregator", "fl_lm", "fl_mqtt", "fl_sim"):
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if any(m == "cryptography" or m.startswith("cryptography.") for m in mods):
                    users.append(f.relative_to(ROOT).as_posix())
    assert sorted(set(users)) == ["shared/_hazmat.py"], sorted(set(users))
