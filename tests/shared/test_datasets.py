from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.datasets import Example, format_prompt, load_file, write_jsonl
from shared.errors import ConfigError, DataError, SchemaError


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
    ('{"instruction": "a"}\n', "line 1: no answer field"),
    ('{"instruction": "a", "output": 5}\n', "line 1: field 'output' must be a string"),
    ('{"output": "a", "extra": 1}\n', "unknown key"),
    ("not json\n", "line 1, column 1: invalid JSON"),
    ('{"output": "a"}\n{"output": "b"\n{"output": "c"}\n', "line 2, column 15: invalid JSON"),
    ("", "no examples"),
    ("\n  \n", "no examples"),
    ('{"instruction": "a", "instances": []}\n', "'instances' must be a non-empty list"),
    ('{"instruction": "a", "instances": [{"input": "x"}]}\n', r"instances\[0\]: missing field 'output'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "last message must be the assistant"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}\n', "'role' must be system, user or assistant"),
    ('{"instruction": "a", "response": "b", "extra": 1}\n', "unknown key.*for a dolly record"),
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
    b = tmp_path / "model.bin"
    b.write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match="model.bin: unsupported file type '.bin'"):
        load_file(b)
    with pytest.raises(DataError, match="no such file"):
        load_file(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        load_file(tmp_path)


def test_a_data_error_is_a_config_error_so_every_command_line_reports_it_in_one_line() -> None:
    assert issubclass(DataError, ConfigError) and issubclass(DataError, SchemaError)


def test_common_formats(tmp_path: Path) -> None:
    recs = [
        {"instruction": "Add.", "input": "1 2", "output": "3"},  # Alpaca
        {"instruction": "Double it.", "instances": [{"input": "2", "output": "4"}, {"input": "5", "output": "10"}],
         "id": "seed_task_1", "name": "double", "is_classification": False},  # self-instruct seed task
        {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"},  # Dolly
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Paris."}]},  # chat (TRL)
    ]
    p = tmp_path / "mixed.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    exs = load_file(p, family="mine")
    assert exs[0] == Example("Add.", "1 2", "3", "mine")
    assert exs[1:3] == [Example("Double it.", "2", "4", "mine"), Example("Double it.", "5", "10", "mine")]
    assert exs[3] == Example("Summarise.", "A long text.", "Short.", "summarization")
    assert exs[4] == Example("Capital of France?", "system: Be brief.", "Paris.", "mine")
    assert len(exs) == 5


def test_utf8_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    p = tmp_path / "win.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"instruction": "Sag hallo.", "output": "Grüß dich"}, ensure_ascii=False).encode())
    [ex] = load_file(p)
    assert ex.instruction == "Sag hallo." and ex.output == "Grüß dich"
    t = tmp_path / "win.txt"
    t.write_bytes(b"\xef\xbb\xbfHello there.")
    assert load_file(t)[0].output == "Hello there."


def test_other_encodings_are_refused_with_file_and_offset_unless_named(tmp_path: Path) -> None:
    p = tmp_path / "latin.txt"
    p.write_bytes("Línea uno\nCanción dos\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt: line 1, byte offset 1: not valid utf-8.*--encoding"):
        load_file(p)
    assert load_file(p, encoding="latin-1")[0].output == "Línea uno\nCanción dos"
    j = tmp_path / "latin.jsonl"
    j.write_bytes(b'{"output": "ok"}\n{"output": "Canci\xf3n"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl: line 2, byte offset 34"):
        load_file(j)
    with pytest.raises(DataError, match="unknown encoding"):
        load_file(j, encoding="no-such-codec")


def test_random_bytes_are_not_text(tmp_path: Path) -> None:
    import random

    p = tmp_path / "noise.txt"
    p.write_bytes(random.Random(0).randbytes(100_000))
    with pytest.raises(DataError, match="not valid utf-8"):
        load_file(p)
    with pytest.raises(DataError, match="does not look like text"):  # every byte decodes as Latin-1
        load_file(p, encoding="latin-1")
    c = tmp_path / "ctrl.txt"
    c.write_text("ok text " * 10 + "\x00\x01\x02" * 10)
    with pytest.raises(DataError, match="control or replacement characters"):
        load_file(c)


def test_prompt_template() -> None:
    assert format_prompt("", "") == ""
    assert format_prompt("Do.", "x").endswith("### Input:\nx\n### Response:\n")
