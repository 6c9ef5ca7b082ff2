"""``docs/CONFIG.md``, generated from the typed configs: every key, its type, default and meaning.

The code stays the single source: a key's meaning is its field's comment, read from the source
(the comment at the end of the field's line, the comment lines right above it, or both; a
``# -- section --`` line is not one). A field with neither shares the block comment of a field
above it in the same group (no blank line, no comment between) when that comment names it
("the keys and the registry": ``registry`` reads "See `keys`."). A field with no meaning at all
is an error (``missing``), as is a docs/CONFIG.md that differs from what this module writes:
``tests/fl_sim/test_config_doc.py`` checks both.

    python -m fl_sim.config_doc            # writes docs/CONFIG.md
    python -m fl_sim.config_doc --check    # exit 1 if it is out of date or a key has no meaning
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import logging
import re
import sys
import tokenize
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "CONFIG.md"
REGENERATE = "python -m fl_sim.config_doc"


@dataclass(frozen=True)
class Source:
    title: str
    module: str
    cls: str
    where: str  # how the file is given to the program that reads it


SOURCES = (
    Source("Aggregator", "aggregator.config", "AggregatorConfig",
           "`fl-agg run --config FILE` (TOML or JSON); `fl-sim` writes one per run under `OUT/config/`."),
    Source("Edge client", "edge_client.config", "EdgeConfig",
           "`fl-edge run --config FILE` (TOML or JSON): the device's own settings, never sent by the aggregator."),
    Source("Device profile", "shared.profiles", "DeviceProfile",
           "`firmware_profiles/NAME.toml`, named by the edge config's `profile` (or a path to such a file)."),
)


@dataclass(frozen=True)
class Key:
    name: str  # dotted: "distil.loss"
    type: str  # as written in the source
    default: str  # rendered; "required" when there is none
    meaning: str  # "" when the field has no comment


@dataclass(frozen=True)
class Section:
    key: str  # "" for the top level, else the table's name ("distil")
    cls: type
    doc: str  # the class docstring, first paragraph
    keys: tuple[Key, ...]


# -- reading the source ------------------------------------------------------------------------------
def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """line -> (comment text without '#', whether the line holds nothing but the comment)."""
    out: dict[int, tuple[str, bool]] = {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            alone = lines[row - 1][:col].strip() == ""
            out[row] = (tok.string.lstrip("#").strip(), alone)
    return out


def _is_section_header(block: list[str]) -> bool:
    return bool(block) and block[0].startswith("-- ")


def _class_node(cls: type) -> ast.ClassDef:
    source = Path(inspect.getfile(cls)).read_text()
    return next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its meaning from the comments in ``cls``'s source ("" when it has none)."""
    comments = _comments(Path(inspect.getfile(cls)).read_text())
    out: dict[str, str] = {}
    group: list[tuple[str, str]] = []  # the fields written together so far: (name, own block comment)
    last_end = -1
    for stmt in _class_node(cls).body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            group, last_end = [], -1
            continue
        name, end = stmt.target.id, stmt.end_lineno or stmt.lineno
        trailing = " ".join(comments[r][0] for r in range(stmt.lineno, end + 1) if r in comments and not comments[r][1])
        lines: list[str] = []
        r = stmt.lineno - 1
        while r in comments and comments[r][1]:
            lines.insert(0, comments[r][0])
            r -= 1
        block = "" if _is_section_header(lines) else " ".join(lines)
        if lines or stmt.lineno != last_end + 1:
            group = []  # a comment or a blank line above starts a new group
        meaning = " ".join(x for x in (block, trailing) if x)
        if not meaning:
            # Written in one group under a block comment that names it: "keys and the registry ...".
            leader = next((g for g, b in reversed(group) if b), None)
            text = dict(group).get(leader or "", "")
            if leader and re.search(rf"\b{re.escape(name)}\b", text):
                meaning = f"See `{leader}`."
        out[name] = meaning
        group.append((name, block))
        last_end = end
    return out


# -- rendering ---------------------------------------------------------------------------------------
def _default(f: dataclasses.Field) -> str:  # type: ignore[type-arg]
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(v):
            return "(table)"
    else:
        return "required"
    if v is None:
        return "unset"
    if isinstance(v, tuple):
        v = list(v)
    return f"`{json.dumps(v)}`"


def _nested(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def sections(cls: type, key: str = "") -> list[Section]:
    """``cls``'s keys, then one section per nested table (depth first, in field order)."""
    hints = typing.get_type_hints(cls)
    meanings = field_comments(cls)
    types = {n.target.id: ast.unparse(n.annotation) for n in ast.walk(ast.parse(inspect.getsource(cls)))
             if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    keys, nested = [], []
    for f in dataclasses.fields(cls):
        sub = _nested(hints[f.name])
        dotted = f"{key}.{f.name}" if key else f.name
        meaning = meanings.get(f.name, "")
        if not meaning and sub is not None:  # a table: its class's docstring says what it is
            meaning = " ".join((ast.get_docstring(_class_node(sub)) or "").split("\n\n")[0].split())
        keys.append(Key(dotted, f"table [{dotted}]" if sub else types.get(f.name, str(hints[f.name])), _default(f), meaning))
        if sub is not None:
            nested.append((dotted, sub))
    doc = (ast.get_docstring(_class_node(cls)) or "").split("\n\n")[0]  # not the repr dataclasses write
    out = [Section(key, cls, " ".join(doc.split()), tuple(keys))]
    for dotted, sub in nested:
        out += sections(sub, dotted)
    return out


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _load(src: Source) -> type:
    import importlib

    return getattr(importlib.import_module(src.module), src.cls)  # type: ignore[no-any-return]


def missing() -> list[str]:
    """One line per key without a meaning, naming its field in the source."""
    out: dict[str, str] = {}
    for src in SOURCES:
        for sec in sections(_load(src)):
            for k in sec.keys:
                field = f"{sec.cls.__module__}.{sec.cls.__name__}.{k.name.rsplit('.', 1)[-1]}"
                if not k.meaning and field not in out:
                    out[field] = (f"{field} ({src.title} key `{k.name}`) has no comment: write its meaning at the end of "
                                  "its line or on the lines above it")
    return list(out.values())


def render() -> str:
    lines = ["# Configuration reference", "",
             f"Generated from the typed configs by `{REGENERATE}`: do not edit it by hand. Each key's meaning is the",
             "comment beside its field in the source, so a change there belongs in the code, and",
             "`tests/fl_sim/test_config_doc.py` fails until this file is regenerated.", "",
             "Every config is a frozen dataclass, checked when it is loaded: an unknown key, a value of the wrong type",
             "or one out of range is an error that names the key. Nested tables are TOML tables (`[distil]`) or JSON",
             "objects. *unset* means the key may be left out (TOML has no null).", ""]
    lines += [f"- [{s.title}](#{s.title.lower().replace(' ', '-')}): `{s.module}.{s.cls}`" for s in SOURCES]
    for src in SOURCES:
        secs = sections(_load(src))
        lines += ["", f"## {src.title}", "", f"`{src.module}.{src.cls}`. {src.where}", ""]
        for sec in secs:
            if sec.key:
                lines += [f"### `[{sec.key}]`", "", f"`{sec.cls.__name__}`." + (f" {sec.doc}" if sec.doc else ""), ""]
            elif sec.doc:
                lines += [sec.doc, ""]
            lines += ["| Key | Type | Default | Meaning |", "|---|---|---|---|"]
            lines += [f"| `{k.name}` | `{_cell(k.type)}` | {_cell(k.default)} | {_cell(k.meaning) or '**no comment**'} |"
                      for k in sec.keys]
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fl_sim.config_doc", description="write docs/CONFIG.md from the typed configs")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is out of date or a key has no meaning")
    args = ap.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    gaps = missing()
    for g in gaps:
        log.error("%s", g)
    text = render()
    if args.check:
        stale = not args.out.exists() or args.out.read_text() != text
        if stale:
            log.error("%s is out of date: run %s", args.out, REGENERATE)
        return 1 if stale or gaps else 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    log.info("wrote %s (%d keys)", args.out, sum(len(s.keys) for src in SOURCES for s in sections(_load(src))))
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
