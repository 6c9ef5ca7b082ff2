"""docs/CONFIG.md is generated from the typed configs (issue 25): every key has an entry and a
meaning taken from its field's comment, and the file matches what the generator writes."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import typing
from pathlib import Path

import pytest

from fl_sim import config_doc


def _walk(cls: type, prefix: str = "") -> list[str]:
    """Every key of ``cls``, nested tables dotted, found independently of the generator."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        tp = hints[f.name]
        for sub in (tp, *typing.get_args(tp)):
            if isinstance(sub, type) and dataclasses.is_dataclass(sub):
                out += _walk(sub, key + ".")
    return out


def test_every_key_has_a_meaning() -> None:
    gaps = config_doc.missing()
    assert not gaps, "\n".join(gaps)


def test_config_md_is_what_the_generator_writes() -> None:
    text = config_doc.render()
    on_disk = config_doc.OUT.read_text() if config_doc.OUT.exists() else ""
    assert on_disk == text, f"docs/CONFIG.md is out of date: run {config_doc.REGENERATE}"


@pytest.mark.parametrize("src", config_doc.SOURCES, ids=lambda s: s.cls)
def test_every_key_of_every_config_has_a_row(src: config_doc.Source) -> None:
    documented = [k.name for s in config_doc.sections(config_doc._load(src)) for k in s.keys]
    want = _walk(config_doc._load(src))
    assert sorted(documented) == sorted(want)
    text = config_doc.render()
    assert all(f"| `{k}` |" in text for k in want)


SAMPLE = '''
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """A sample config."""

    plain: int = 1
    trailing: int = 2  # what the trailing comment says
    # the block above says
    # it over two lines
    block: str = "x"
    # why this default
    both: float = 0.5  # and what it is
    # -- a section header ---------
    after_header: bool = False
    # Security: the keys and the registry of enrolled devices.
    keys: str = ""
    registry: str = ""
    unnamed: str = ""

    grouped_after_blank: str = ""
'''

CASES = {
    "plain": "",
    "trailing": "what the trailing comment says",
    "block": "the block above says it over two lines",
    "both": "why this default and what it is",
    "after_header": "",  # a section header is not a meaning
    "keys": "Security: the keys and the registry of enrolled devices.",
    "registry": "See `keys`.",  # written in keys' group, and its block names it
    "unnamed": "",  # in the group, but the block does not name it
    "grouped_after_blank": "",
}


def test_meanings_come_from_the_fields_comments(tmp_path: Path) -> None:
    f = tmp_path / "sample_config_mod.py"
    f.write_text(SAMPLE)
    spec = importlib.util.spec_from_file_location("sample_config_mod", f)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sample_config_mod"] = mod
    try:
        spec.loader.exec_module(mod)
        assert config_doc.field_comments(mod.Sample) == CASES
        (sec,) = config_doc.sections(mod.Sample)
        assert sec.doc == "A sample config."
        assert {k.name: k.default for k in sec.keys}["block"] == '`"x"`'
    finally:
        del sys.modules["sample_config_mod"]
