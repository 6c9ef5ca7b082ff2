from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.datasets import Example, format_prompt, load_file, write_jsonl
from shared.errors import SchemaError


def test_alpaca_jsonl_round_trip(tmp_path: Path) -> None:
    exs = [Example("Add.", "1 2", "3", "arith"), Example("Say hi.", "", "hi", "chat")]
    p = tmp_path / "d.jsonl"
    write_jsonl(p, exs)
    assert load_file(p) == exs


def test_alpaca_json_array_and_defaults(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"instruction": "Name a colour.", "input": "", "output": "red"}]))
    [ex] = load_file(p, family="mine")
    assert ex.family == "mine" and ex.prompt == "### Instruction:\nName a colour.\n### Response:\n"


def test_plain_text_is_split_into_pieces(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("\n".join(f"line {i} " + "x" * 50 for i in range(40)))
    exs = load_file(p)
    assert len(exs) > 3 and all(e.prompt == "" for e in exs)
    assert all(len(e.output) <= 2 * 400 for e in exs)
    assert "line 0" in exs[0].output and "line 39" in exs[-1].output


@pytest.mark.parametrize(("content", "match"), [
    ('{"instruction": "a"}\n', "'output' must be a string"),
    ('{"output": "a", "extra": 1}\n', "unknown key"),
    ("not json\n", "invalid JSON"),
    ("", "no examples"),
])
def test_bad_user_data_is_a_clear_error(tmp_path: Path, content: str, match: str) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(SchemaError, match=match):
        load_file(p)


def test_unsupported_suffix(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("a,b")
    with pytest.raises(SchemaError, match="unsupported file type"):
        load_file(p)


def test_prompt_template() -> None:
    assert format_prompt("", "") == ""
    assert format_prompt("Do.", "x").endswith("### Input:\nx\n### Response:\n")
