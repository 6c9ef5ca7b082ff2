"""Instruction/response task families with exact answers, generated from a seed.

Private families are what devices train on (each device sees a skewed mix); public families
teach the offline base model the prompt format and stand in for the public prompts the
aggregator distils on. A family is a function ``rng -> (instruction, input, output)``.
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
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice(("add", "subtract", "multiply"))
    if op == "add":
        return "Add the two numbers.", f"{a} {b}", str(a + b)
    if op == "subtract":
        return "Subtract the second number from the first.", f"{a} {b}", str(a - b)
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    return "Multiply the two numbers.", f"{a} {b}", str(a * b)


def _string(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(_WORDS)
    op = rng.choice(("reverse", "upper", "first3"))
    if op == "reverse":
        return "Reverse the word.", w, w[::-1]
    if op == "upper":
        return "Write the word in capital letters.", w, w.upper()
    return "Give the first three letters of the word.", w, w[:3]


def _list(rng: random.Random) -> tuple[str, str, str]:
    xs = [rng.randint(0, 20) for _ in range(rng.randint(3, 5))]
    op = rng.choice(("sort", "max", "len"))
    shown = " ".join(map(str, xs))
    if op == "sort":
        return "Sort the numbers in ascending order.", shown, " ".join(map(str, sorted(xs)))
    if op == "max":
        return "Give the largest number.", shown, str(max(xs))
    return "How many numbers are in the list?", shown, str(len(xs))


def _units(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(1, 30)
    unit, target, factor = rng.choice(
        (("km", "meters", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60), ("kg", "grams", 1000), ("days", "hours", 24))
    )
    return f"Convert to {target}.", f"{n} {unit}", str(n * factor)


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


def _copy(rng: random.Random) -> tuple[str, str, str]:
    ws = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4)))
    return "Repeat the text.", ws, ws


def _count(rng: random.Random) -> tuple[str, str, str]:
    start = rng.randint(0, 20)
    k = rng.randint(2, 5)
    return "Count up from the number.", str(start), " ".join(str(start + i) for i in range(1, k + 1))


PRIVATE_FAMILIES: dict[str, Gen] = {
    "arithmetic": _arith,
    "string": _string,
    "list": _list,
    "units": _units,
    "facts": _facts,
}
PUBLIC_FAMILIES: dict[str, Gen] = {"copy": _copy, "count": _count}


def generate(family: str, n: int, seed: int) -> list[Example]:
    """``n`` examples of one family; same (family, n, seed) gives the same list."""
    gen = {**PRIVATE_FAMILIES, **PUBLIC_FAMILIES}.get(family)
    if gen is None:
        raise ValueError(f"unknown task family {family!r}; known: {sorted({**PRIVATE_FAMILIES, **PUBLIC_FAMILIES})}")
    rng = random.Random(f"{family}:{seed}")
    return [Example(*gen(rng), family=family) for _ in range(n)]


def heldout(family: str, n: int, seed: int, exclude: list[Example]) -> list[Example]:
    """Evaluation examples whose (instruction, input) never appear in ``exclude``.

    The facts family has a finite table, so its held-out questions may ask about facts seen in
    training (as a user would); the other families never repeat a training question.
    """
    seen = {(e.instruction, e.input) for e in exclude}
    rng = random.Random(f"heldout:{family}:{seed}")
    gen = {**PRIVATE_FAMILIES, **PUBLIC_FAMILIES}[family]
    out: list[Example] = []
    tries = 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        ex = Example(*gen(rng), family=family)
        if family != "facts" and (ex.instruction, ex.input) in seen:
            continue
        out.append(ex)
    return out
