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
        ("wrong student path", ["--student", str(tmp / "no-such-model")], "--student .*no-such-model: no such directory"),
        ("tokenizer as student", ["--student", str(tok)], "--student .*tokenizer: a tokenizer directory"),
    ]


def test_each_mistake_is_one_line_and_nothing_starts(tiny_models: dict[str, str], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    import re

    for name, args, match in _cases(tmp_path, tiny_models):
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
