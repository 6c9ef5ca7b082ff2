"""Instruction data on disk: Alpaca-style JSONL and plain text, plus the prompt template.

The template is part of the protocol: devices train and the aggregator evaluates with the same
one, so it lives here. Loss is taken on the response only (``Example.prompt`` is masked).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shared.errors import SchemaError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
# Plain text is cut into pieces of about this many characters, on paragraph or line boundaries.
TEXT_PIECE_CHARS = 400


@dataclass(frozen=True)
class Example:
    """One training or evaluation example. ``family`` names the task family for per-family metrics."""

    instruction: str
    input: str
    output: str
    family: str = "data"

    @property
    def prompt(self) -> str:
        return format_prompt(self.instruction, self.input)


def format_prompt(instruction: str, input_text: str = "") -> str:
    """Alpaca-style prompt; empty for plain text (then the whole text is the response)."""
    if not instruction and not input_text:
        return ""
    if input_text:
        return f"### Instruction:\n{instruction}\n### Input:\n{input_text}\n### Response:\n"
    return f"### Instruction:\n{instruction}\n### Response:\n"


def _record(obj: object, where: str, family: str) -> Example:
    if not isinstance(obj, dict):
        raise SchemaError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    allowed = {"instruction", "input", "output", "family"}
    extra = set(obj) - allowed
    if extra:
        raise SchemaError(f"{where}: unknown key(s) {sorted(extra)}; allowed {sorted(allowed)}")
    if "output" not in obj or not isinstance(obj["output"], str):
        raise SchemaError(f"{where}: 'output' must be a string")
    for k in ("instruction", "input", "family"):
        if k in obj and not isinstance(obj[k], str):
            raise SchemaError(f"{where}: {k!r} must be a string")
    return Example(
        instruction=str(obj.get("instruction", "")),
        input=str(obj.get("input", "")),
        output=obj["output"],
        family=str(obj.get("family", family)),
    )


def load_jsonl(path: Path, family: str = "data") -> list[Example]:
    """Alpaca JSONL (one object a line) or a JSON array of such objects."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            arr = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path}: invalid JSON: {e}") from e
        return [_record(o, f"{path}[{i}]", family) for i, o in enumerate(arr)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path}:{n}: invalid JSON: {e}") from e
        out.append(_record(obj, f"{path}:{n}", family))
    return out


def load_text(path: Path, family: str = "data") -> list[Example]:
    """Plain text split into pieces of about TEXT_PIECE_CHARS characters; loss on every token."""
    text = path.read_text(encoding="utf-8", errors="replace")
    pieces: list[str] = []
    cur = ""
    for para in text.replace("\r\n", "\n").split("\n"):
        if cur and len(cur) + len(para) + 1 > TEXT_PIECE_CHARS:
            pieces.append(cur)
            cur = ""
        cur = f"{cur}\n{para}" if cur else para
        while len(cur) > 2 * TEXT_PIECE_CHARS:
            pieces.append(cur[:TEXT_PIECE_CHARS])
            cur = cur[TEXT_PIECE_CHARS:]
    if cur.strip():
        pieces.append(cur)
    return [Example("", "", p.strip(), family) for p in pieces if p.strip()]


def load_file(path: str | Path, family: str | None = None) -> list[Example]:
    p = Path(path)
    fam = family or "data"
    if p.suffix in JSONL_SUFFIXES:
        examples = load_jsonl(p, fam)
    elif p.suffix in TEXT_SUFFIXES:
        examples = load_text(p, fam)
    else:
        raise SchemaError(f"{p}: unsupported file type {p.suffix!r}; use {JSONL_SUFFIXES + TEXT_SUFFIXES}")
    if not examples:
        raise SchemaError(f"{p}: no examples found")
    log.debug("loaded %d examples from %s", len(examples), p)
    return examples


def write_jsonl(path: Path, examples: Iterable[Example]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"instruction": ex.instruction, "input": ex.input, "output": ex.output, "family": ex.family}) + "\n")
            n += 1
    return n
