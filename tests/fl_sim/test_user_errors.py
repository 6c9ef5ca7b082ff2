"""A new user's mistakes end in one line naming the file, line and field, and exit status 2 (issue 14).

Each case runs ``fl-sim`` in this process up to the point where it would start processes: the
data and model checks come first, so nothing starts and nothing is written for a bad input.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from fl_sim import cli

GOOD = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(40)]


def _jsonl(recs: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in recs)


def _cases(tmp: Path, tiny_models: dict[str, str]) -> list[tuple[str, list[str], str]]:
    def f(name: str, data: bytes | str) -> str:
        p = tmp / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(p)

    lines = _jsonl(GOOD).splitlines(keepends=True)
    tok = Path(tiny_models["student"]).parent / "tokenizer"
    return [
        ("empty file", ["--data", f("empty.jsonl", "")], "empty.jsonl: no examples found"),
        ("one malformed line", ["--data", f("bad.jsonl", "".join(lines[:5] + ['{"instruction": "x", "output": \n'] + lines[5:]))],
         "bad.jsonl: line 6, column 32: invalid JSON"),
        ("record without output", ["--data", f("noout.jsonl", _jsonl(GOOD[:3] + [{"instruction": "x", "input": "y"}]))],
         "noout.jsonl: line 4: no answer field"),
        ("binary file", ["--data", f("weights.bin", bytes(range(256)) * 4)], "weights.bin: unsupported file type '.bin'"),
        ("latin-1 text", ["--data", f("latin.txt", ("Canción de cuna. " * 50).encode("latin-1"))],
         "latin.txt: line 1, byte offset 5: not valid utf-8"),
        ("random bytes", ["--data", f("noise.txt", random.Random(1).randbytes(100_000))], "noise.txt: line 1, byte offset"),
        ("non-utf8 jsonl", ["--data", f("cp.jsonl", _jsonl(GOOD[:3]).encode() + b'{"output": "se\xf1or"}\n')],
         r"cp.jsonl: line 4, byte offset \d+: not valid utf-8"),
        ("self-instruct without instances", ["--data", f("si.jsonl", _jsonl(GOOD[:3] + [{"instruction": "x", "instances": []}]))],
         "si.jsonl: line 4: field 'instances' must be a non-empty list"),
        ("self-instruct instance without output", ["--data", f("si2.jsonl", _jsonl([{"instruction": "x", "instances": [{"input": "1"}]}]))],
         r"si2.jsonl: line 1: instances\[0\]: missing field 'output'"),
        ("chat ending with the user", ["--data", f("chat.jsonl", _jsonl([{"messages": [{"role": "user", "content": "hi"}]}]))],
         "chat.jsonl: line 1: the last message must be the assistant's answer"),
        ("chat with an unknown role", ["--data", f("chat2.jsonl", _jsonl([{"messages": [{"role": "bot", "content": "hi"}]}]))],
         r"chat2.jsonl: line 1: messages\[0\]: field 'role' must be system, user or assistant"),
        ("chat content not a string", ["--data", f("chat3.jsonl", _jsonl([{"messages": [{"role": "user", "content": ["x"]}]}]))],
         r"chat3.jsonl: line 1: messages\[0\]: field 'content' must be a string, got list"),
        ("dolly without response", ["--data", f("dolly.jsonl", _jsonl([{"instruction": "x", "context": "y"}]))],
         "dolly.jsonl: line 1: missing field 'response'"),
        ("output not a string", ["--data", f("num.jsonl", _jsonl([{"instruction": "x", "output": 3}]))],
         "num.jsonl: line 1: field 'output' must be a string, got int"),
        ("unknown key", ["--data", f("extra.jsonl", _jsonl([{"instruction": "x", "output": "y", "label": 1}]))],
         r"extra.jsonl: line 1: unknown key\(s\) \['label'\]"),
        ("a line that is a list", ["--data", f("list.jsonl", "[1, 2]\n")], "list.jsonl: record 0: expected a JSON object"),
        ("a JSON array with a broken record", ["--data", f("arr.json", json.dumps([{"output": "a"}, {"instruction": "b"}]))],
         "arr.json: record 1: no answer field"),
        ("a truncated JSON array", ["--data", f("trunc.json", '[{"output": "a"}, {"outp')], r"trunc.json: line 1, column \d+: invalid JSON"),
        ("control bytes as text", ["--data", f("ctrl.txt", "ok " * 20 + "\x00\x01\x02\x03" * 40)],
         "ctrl.txt: does not look like text"),
        ("only blank lines", ["--data", f("blank.jsonl", "\n\n   \n")], "blank.jsonl: no examples found"),
        ("missing data file", ["--data", str(tmp / "nowhere.jsonl")], "nowhere.jsonl: no such file"),
        ("too few examples to split", ["--data", f("tiny.jsonl", _jsonl(GOOD[:2]))], "too few to hold out"),
        ("unknown encoding", ["--data", f("enc.txt", "hello"), "--encoding", "no-such-codec"], "enc.txt: unknown encoding"),
        ("wrong student path", ["--student", str(tmp / "no-such-model")], "--student .*no-such-model: no such directory"),
        ("student is a file", ["--student", str(Path(tiny_models["student"]) / "config.json")], "--student .*config.json: is a file"),
        ("wrong teacher path", ["--teacher", "./no/such/teacher"], "--teacher ./no/such/teacher: no such directory"),
        ("tokenizer as student", ["--student", str(tok)], "--student .*tokenizer: a tokenizer directory"),
    ]


def test_each_mistake_is_one_line_and_nothing_starts(tiny_models: dict[str, str], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    import re

    cases = _cases(tmp_path, tiny_models)
    assert len(cases) >= 20
    for name, args, match in cases:
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        caplog.clear()
        with caplog.at_level(logging.INFO):
            rc = cli.main([*args, "--out", str(out), "--devices", "2", "--rounds", "1", "--mode", "fedit"])
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert rc == 2, name
        assert len(errors) == 1 and "\n" not in errors[0].getMessage(), (name, [r.getMessage() for r in errors])
        assert re.search(match, errors[0].getMessage()), (name, errors[0].getMessage())
        assert not any(r.exc_info for r in caplog.records), name
        assert not (out / "config").exists() and not (out / "edge").exists(), name  # nothing was started


def test_a_bom_and_the_common_formats_are_accepted(tmp_path: Path) -> None:
    from fl_sim import prepare

    recs = GOOD[:20] + [{"instruction": "Double.", "instances": [{"input": "2", "output": "4"}] * 5},
                        {"instruction": "Sum up.", "context": "Long.", "response": "Short."},
                        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}]
    p = tmp_path / "mine.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + _jsonl(recs).encode())
    data = prepare.user_data(p, 2, seed=0)
    assert sum(len(s) for s in data.shards) + len(data.public) + sum(map(len, data.heldout.values())) == 27


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from shared.errors import DataError

    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(DataError, match="no examples"):
        cli.main(["--data", str(p), "--out", str(tmp_path / "o"), "--devices", "2", "--rounds", "1", "--debug"])
