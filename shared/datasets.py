"""Instruction data on disk: JSONL in the common instruction formats and plain text, plus the prompt template.

The template is part of the protocol: devices train and the aggregator evaluates with the same
one, so it lives here. Loss is taken on the response only (``Example.prompt`` is masked).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shared.errors import DataError

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


# The record formats we read, by the keys that identify them. Each becomes one or more Examples.
FORMATS = {
    "alpaca": "instruction, input, output (plus our optional family)",
    "self-instruct": "instruction, instances: [{input, output}]",
    "dolly": "instruction, context, response (category becomes the family)",
    "chat": "messages: [{role, content}] (system, user, assistant; the last assistant turn is the answer)",
}
_KNOWN_KEYS = {
    "alpaca": {"instruction", "input", "output", "family", "id", "text"},
    "self-instruct": {"instruction", "instances", "family", "id", "name", "is_classification"},
    "dolly": {"instruction", "context", "response", "category", "family", "id"},
    "chat": {"messages", "family", "id"},
}
# Fraction of decoded characters that may be control characters (other than tab, newline, CR,
# form feed) or replacement characters before a file is called binary rather than text.
MAX_CONTROL_FRACTION = 0.01


def _str_field(obj: dict, key: str, where: str, *, required: bool = False) -> str:
    if key not in obj:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return ""
    v = obj[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def _kind(obj: dict, where: str) -> str:
    if "messages" in obj:
        return "chat"
    if "instances" in obj:
        return "self-instruct"
    if "response" in obj or "context" in obj:
        return "dolly"
    if "output" in obj:
        return "alpaca"
    raise DataError(f"{where}: no answer field: expected one of 'output' (Alpaca), 'instances' (self-instruct), "
                    f"'response' (Dolly) or 'messages' (chat); got keys {sorted(obj)}")


def _records(obj: object, where: str, family: str) -> list[Example]:
    """One JSON record in any of FORMATS -> its Examples."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    kind = _kind(obj, where)
    extra = set(obj) - _KNOWN_KEYS[kind]
    if extra:
        raise DataError(f"{where}: unknown key(s) {sorted(extra)} for a {kind} record; allowed {sorted(_KNOWN_KEYS[kind])}")
    fam = _str_field(obj, "family", where) or family
    if kind == "alpaca":
        return [Example(_str_field(obj, "instruction", where), _str_field(obj, "input", where),
                        _str_field(obj, "output", where, required=True), fam)]
    if kind == "dolly":
        fam = _str_field(obj, "family", where) or _str_field(obj, "category", where) or family
        return [Example(_str_field(obj, "instruction", where, required=True), _str_field(obj, "context", where),
                        _str_field(obj, "response", where, required=True), fam)]
    if kind == "self-instruct":
        instr = _str_field(obj, "instruction", where, required=True)
        inst = obj["instances"]
        if not isinstance(inst, list) or not inst:
            raise DataError(f"{where}: field 'instances' must be a non-empty list of {{input, output}} objects")
        out = []
        for i, x in enumerate(inst):
            w = f"{where}: instances[{i}]"
            if not isinstance(x, dict):
                raise DataError(f"{w}: expected an object, got {type(x).__name__}")
            out.append(Example(instr, _str_field(x, "input", w), _str_field(x, "output", w, required=True), fam))
        return out
    return [_chat(obj["messages"], where, fam)]


def _chat(msgs: object, where: str, family: str) -> Example:
    """Chat messages -> one Example: the last assistant turn is the answer, the last user turn the
    instruction, the system prompt and earlier turns the input (as a transcript)."""
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    turns = []
    for i, m in enumerate(msgs):
        w = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{w}: expected an object, got {type(m).__name__}")
        role = _str_field(m, "role", w, required=True)
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{w}: field 'role' must be system, user or assistant, got {role!r}")
        turns.append((role, _str_field(m, "content", w, required=True)))
    if turns[-1][0] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer, got role {turns[-1][0]!r}")
    if len(turns) < 2 or turns[-2][0] != "user":
        raise DataError(f"{where}: the assistant's answer must follow a user message")
    context = "\n".join(f"{r}: {c}" for r, c in turns[:-2])
    return Example(turns[-2][1], context, turns[-1][1], family)


def _not_text(ch: str) -> bool:
    o = ord(ch)
    return (o < 32 and ch not in "\t\n\r\f") or 0x7F <= o < 0xA0 or ch == "\ufffd"


def read_text(path: Path, encoding: str | None = None) -> str:
    """A user's file as text: UTF-8 (with or without a byte-order mark) unless ``encoding`` names
    another; undecodable or mostly-control-byte content is refused with the file and offset."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    enc = encoding or "utf-8"
    if enc.replace("-", "").replace("_", "").lower() in ("utf8", "utf8sig"):
        enc = "utf-8-sig"  # strips a leading BOM, which many Windows tools write
    try:
        text = raw.decode(enc)
    except LookupError:
        raise DataError(f"{path}: unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        hint = "" if encoding else "; if it is another encoding, name it (--encoding latin-1, for example)"
        raise DataError(f"{path}: line {line}, byte offset {e.start}: not valid {enc.removesuffix('-sig')} "
                        f"({e.reason}){hint}") from None
    if text:
        bad = sum(map(_not_text, text))
        if bad > MAX_CONTROL_FRACTION * len(text):
            first = next(i for i, ch in enumerate(text) if _not_text(ch))
            raise DataError(f"{path}: does not look like text: {bad} of {len(text)} characters are control or "
                            f"replacement characters (first at character {first}); is it a binary file?")
    return text


def load_jsonl(path: Path, family: str = "data", encoding: str | None = None) -> list[Example]:
    """JSONL (one record a line) or a JSON array of records, each in any of FORMATS."""
    text = read_text(path, encoding)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            arr = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from None
        return [ex for i, o in enumerate(arr) for ex in _records(o, f"{path}: record {i}", family)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}, column {e.colno}: invalid JSON: {e.msg}") from None
        out.extend(_records(obj, f"{path}: line {n}", family))
    return out


def load_text(path: Path, family: str = "data", encoding: str | None = None) -> list[Example]:
    """Plain text split into pieces of about TEXT_PIECE_CHARS characters; loss on every token."""
    text = read_text(path, encoding)
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


def load_file(path: str | Path, family: str | None = None, encoding: str | None = None) -> list[Example]:
    p = Path(path)
    fam = family or "data"
    if not p.exists():
        raise DataError(f"{p}: no such file")
    if p.is_dir():
        raise DataError(f"{p}: is a directory; expected a {'/'.join(JSONL_SUFFIXES + TEXT_SUFFIXES)} file")
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        examples = load_jsonl(p, fam, encoding)
    elif suffix in TEXT_SUFFIXES:
        examples = load_text(p, fam, encoding)
    else:
        raise DataError(f"{p}: unsupported file type {p.suffix!r}; use {', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES)} "
                        f"(records: {'; '.join(f'{k}: {v}' for k, v in FORMATS.items())})")
    if not examples:
        raise DataError(f"{p}: no examples found (the file is empty or holds only blank lines)")
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
