from __future__ import annotations

from collections import Counter

import pytest

from fl_sim import partition, tasks


def test_generation_is_deterministic_and_answers_are_exact() -> None:
    a = tasks.generate("arithmetic", 50, seed=1)
    assert a == tasks.generate("arithmetic", 50, seed=1)
    assert a != tasks.generate("arithmetic", 50, seed=2)
    for e in a:
        n = int(e.input)
        assert e.output == str(n + 1 if e.instruction.startswith("Add one") else n - 1)
    for e in tasks.generate("list", 30, 0):
        xs = list(map(int, e.input.split()))
        want = {"Give the first number.": xs[0], "Give the last number.": xs[-1]}.get(e.instruction, len(xs))
        assert e.output == str(want)
    for e in tasks.generate("string", 30, 0):
        ws = e.input.split()
        assert e.output == {"Give the first word.": ws[0], "Give the last word.": ws[-1]}.get(e.instruction, f"{ws[-1]} {ws[-1]}")
    for e in tasks.generate("units", 30, 0):
        n, unit = e.input.split()
        assert e.output.startswith(n) and set(e.output[len(n):]) <= {"0"} and len(e.output) > len(n)


def test_facts_table_is_consistent() -> None:
    answers: dict[tuple[str, str], str] = {}
    for e in tasks.generate("facts", 200, 0) + tasks.generate("facts", 200, 5):
        assert answers.setdefault((e.instruction, e.input), e.output) == e.output


def test_heldout_excludes_training_questions() -> None:
    train = tasks.generate("arithmetic", 200, 0)
    seen = {(e.instruction, e.input) for e in train}
    held = tasks.heldout("arithmetic", 30, 0, train)
    assert len(held) == 30 and not any((e.instruction, e.input) in seen for e in held)


def test_unknown_family() -> None:
    with pytest.raises(ValueError, match="unknown task family"):
        tasks.generate("poetry", 1, 0)


def _all() -> list:
    return [e for f in tasks.PRIVATE_FAMILIES for e in tasks.generate(f, 60, 0)]


def test_dirichlet_split_covers_every_example_once_and_is_skewed() -> None:
    exs = _all()
    shards = partition.split_dirichlet(exs, 4, alpha=0.3, seed=0)
    assert sorted(map(id, (e for s in shards for e in s))) == sorted(map(id, exs))
    assert min(len(s) for s in shards) >= 8
    mixes = [Counter(e.family for e in s) for s in shards]
    # non-IID: some device's largest family is far above the uniform 1/5 share
    assert max(m.most_common(1)[0][1] / sum(m.values()) for m in mixes) > 0.4
    # near-IID with a large alpha
    iid = partition.split_dirichlet(exs, 4, alpha=1000.0, seed=0)
    for s in iid:
        c = Counter(e.family for e in s)
        assert max(c.values()) / sum(c.values()) < 0.35


def test_family_split() -> None:
    shards = partition.split_by_family(_all(), 5)
    assert [len({e.family for e in s}) for s in shards] == [1] * 5


def test_bad_alpha() -> None:
    with pytest.raises(ValueError, match="alpha"):
        partition.split_dirichlet(_all(), 2, 0.0, 0)
