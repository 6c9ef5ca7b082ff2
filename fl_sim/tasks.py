"""Instruction/response task families with exact answers, generated from a seed.

Private families are what devices train on (each device sees a skewed mix); public families are
the aggregator's: they pretrain the offline base models and are the public prompts the
aggregator distils on. A family is a function ``rng -> (instruction, input, output)``.

The families are chosen so that a sub-million-parameter student with LoRA can learn them on two
CPU cores in a few thousand steps (centralized training reaches a mean exact match near 0.7; see
benchmarks/README.md): each needs a procedure (copy, count, increment, append zeros) or a table
(invented facts), and held-out questions are never training questions, except for the fact table.
Digits are single tokens (``fl_lm.build``), so number answers are learnable digit by digit.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from shared.datasets import Example

Gen = Callable[[random.Random], tuple[str, str, str]]

_WORDS = (
    "apple river stone cloud maple tiger lemon piano candle rocket violet garden silver "
    "window forest orange planet marble copper winter yellow bottle spider castle ocean "
    "pepper rabbit camera dragon summer pencil"
).split()
_SYL = ("ka", "lo", "mi", "ren", "ta", "vo", "zel", "qu", "ar", "nis", "to", "bel", "dra", "sun", "ei", "or")


def _arith(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(0, 999)
    if rng.random() < 0.5:
        return "Add one to the number.", str(n), str(n + 1)
    return "Subtract one from the number.", str(n), str(n - 1)


def _string(rng: random.Random) -> tuple[str, str, str]:
    ws = [rng.choice(_WORDS) for _ in range(rng.randint(2, 4))]
    op = rng.choice(("first", "last", "twice"))
    shown = " ".join(ws)
    if op == "first":
        return "Give the first word.", shown, ws[0]
    if op == "last":
        return "Give the last word.", shown, ws[-1]
    return "Write the last word twice.", shown, f"{ws[-1]} {ws[-1]}"


def _list(rng: random.Random) -> tuple[str, str, str]:
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    op = rng.choice(("first", "last", "len"))
    shown = " ".join(map(str, xs))
    if op == "first":
        return "Give the first number.", shown, str(xs[0])
    if op == "last":
        return "Give the last number.", shown, str(xs[-1])
    return "How many numbers are in the list?", shown, str(len(xs))


# unit, target unit, powers of ten between them: the answer is the number with that many zeros.
_UNITS = (("km", "meters", 3), ("kg", "grams", 3), ("meters", "centimeters", 2), ("liters", "deciliters", 1),
          ("tonnes", "kg", 3), ("decades", "years", 1))


def _units(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(1, 99)
    unit, target, zeros = rng.choice(_UNITS)
    return f"Convert to {target}.", f"{n} {unit}", str(n) + "0" * zeros


def _fact_table(seed: int = 7, n: int = 24) -> list[tuple[str, str, str]]:
    """A seeded table of invented countries with a capital and a colour, the same for every device."""
    rng = random.Random(seed)
    rows = []
    seen: set[str] = set()
    while len(rows) < n:
        country = "".join(rng.choice(_SYL) for _ in range(3)).capitalize()
        capital = "".join(rng.choice(_SYL) for _ in range(2)).capitalize()
        if country in seen:
            continue
        seen.add(country)
        rows.append((country, capital, rng.choice(("red", "blue", "green", "gold", "white", "black"))))
    return rows


_FACTS = _fact_table()


def _facts(rng: random.Random) -> tuple[str, str, str]:
    country, capital, colour = rng.choice(_FACTS)
    if rng.random() < 0.5:
        return "What is the capital of this country?", country, capital
    return "What colour is the flag of this country?", country, colour


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3))).capitalize()


def _copy(rng: random.Random) -> tuple[str, str, str]:
    items = []
    for _ in range(rng.randint(1, 5)):
        k = rng.random()
        items.append(rng.choice(_WORDS) if k < 0.35 else str(rng.randint(0, 999)) if k < 0.7 else _name(rng))
    shown = " ".join(items)
    return "Repeat the text.", shown, shown


def generic_text(n: int, seed: int) -> list[Example]:
    """Stand-in for the generic public text a real base model is pretrained on: words, numbers and
    invented names in repeat-after-me form, so every token of the vocabulary gets trained. Not a
    task anyone is scored on (a sub-million-parameter model does not learn to copy names here)."""
    rng = random.Random(f"generic:{seed}")
    return [Example(*_copy(rng), family="generic") for _ in range(n)]


def _trivia_table(seed: int = 11, n: int = 80) -> list[tuple[str, str, str]]:
    """A public table of invented animals with a food and a home: what a big model has read about."""
    rng = random.Random(seed)
    rows: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        animal = "".join(rng.choice(_SYL) for _ in range(2)) + rng.choice(("pig", "fox", "owl", "cat"))
        if animal in seen:
            continue
        seen.add(animal)
        rows.append((animal, rng.choice(("seeds", "fish", "leaves", "honey", "roots", "berries", "worms", "grass")),
                     rng.choice(("caves", "trees", "rivers", "deserts", "mountains", "swamps"))))
    return rows


_TRIVIA = _trivia_table()


def _trivia(rng: random.Random) -> tuple[str, str, str]:
    animal, food, home = rng.choice(_TRIVIA)
    if rng.random() < 0.5:
        return "What does this animal eat?", animal, food
    return "Where does this animal live?", animal, home


def _count(rng: random.Random) -> tuple[str, str, str]:
    start, k = rng.randint(0, 99), rng.randint(2, 5)
    return "Count up from the first number, as many steps as the second.", f"{start} {k}", " ".join(str(start + i) for i in range(1, k + 1))


PRIVATE_FAMILIES: dict[str, Gen] = {
    "arithmetic": _arith,
    "string": _string,
    "list": _list,
    "units": _units,
    "facts": _facts,
}
PUBLIC_FAMILIES: dict[str, Gen] = {"count": _count, "trivia": _trivia}


TABLE_FAMILIES = frozenset({"facts", "trivia"})  # answers from a fixed table: questions repeat by design


def generate(family: str, n: int, seed: int) -> list[Example]:
    """``n`` examples of one family; same (family, n, seed) gives the same list."""
    gen = {**PRIVATE_FAMILIES, **PUBLIC_FAMILIES}.get(family)
    if gen is None:
        raise ValueError(f"unknown task family {family!r}; known: {sorted({**PRIVATE_FAMILIES, **PUBLIC_FAMILIES})}")
    rng = random.Random(f"{family}:{seed}")
    return [Example(*gen(rng), family=family) for _ in range(n)]


def heldout(family: str, n: int, seed: int, exclude: list[Example]) -> list[Example]:
    """Evaluation examples whose (instruction, input) never appear in ``exclude``.

    The facts and trivia families have finite tables, so their held-out questions may ask about
    facts seen in training (as a user would); the other families never repeat a training question.
    """
    seen = {(e.instruction, e.input) for e in exclude}
    rng = random.Random(f"heldout:{family}:{seed}")
    gen = {**PRIVATE_FAMILIES, **PUBLIC_FAMILIES}[family]
    out: list[Example] = []
    tries = 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        ex = Example(*gen(rng), family=family)
        if family not in TABLE_FAMILIES and (ex.instruction, ex.input) in seen:
            continue
        out.append(ex)
    return out
