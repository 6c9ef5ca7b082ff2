"""Fixtures shared by the test packages: tiny offline models and a real Mosquitto."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import Mosquitto, start_mosquitto

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub


# --- test order: every test must build what it asserts on ------------------------------------------
#
# ``--test-order reverse`` or ``--test-order shuffle:SEED`` (or FLM_TEST_ORDER=...) runs the modules,
# and the tests within each module (and class), in reverse or seeded-shuffled order. A module's
# tests stay together, so its module-scoped fixtures are still built once. ``tests/run_isolated.py``
# also runs each module alone.

ORDER_ENV = "FLM_TEST_ORDER"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--test-order", default=os.environ.get(ORDER_ENV, "default"), metavar="ORDER",
                     help="default, reverse, shuffle (a fresh seed, printed) or shuffle:SEED; modules and the "
                          f"tests in each are reordered, each module's tests kept together (env: {ORDER_ENV})")


def _order(config: pytest.Config) -> tuple[str, int | None]:
    """(mode, seed) from --test-order; a bad value is a usage error, not a silent default order."""
    if not hasattr(config, "_flm_order"):
        value = str(config.getoption("--test-order"))
        mode, _, seed = value.partition(":")
        if mode not in ("default", "reverse", "shuffle") or (seed and (mode != "shuffle" or not seed.isdigit())):
            raise pytest.UsageError(f"--test-order {value!r}: use default, reverse, shuffle or shuffle:SEED")
        n: int | None = None
        if mode == "shuffle":
            n = int(seed) if seed else random.SystemRandom().randrange(10**6)
        config._flm_order = (mode, n)  # type: ignore[attr-defined]
    return config._flm_order  # type: ignore[attr-defined,no-any-return]


def pytest_report_header(config: pytest.Config) -> str | None:
    mode, seed = _order(config)
    if mode == "default":
        return None
    return f"test order: {mode}" + (f":{seed} (rerun with --test-order shuffle:{seed})" if seed is not None else "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mode, seed = _order(config)
    if mode == "default":
        return
    rng = random.Random(seed)

    def reorder(seq: list) -> list:  # type: ignore[type-arg]
        if mode == "reverse":
            return seq[::-1]
        out = list(seq)
        rng.shuffle(out)
        return out

    # module -> class (or None) -> items, in collection order; reordered at each level.
    groups: dict[str, dict[str, list[pytest.Item]]] = {}
    for item in items:
        module, _, rest = item.nodeid.partition("::")
        cls = rest.split("::")[0] if getattr(item, "cls", None) is not None else ""
        groups.setdefault(module, {}).setdefault(cls, []).append(item)
    items[:] = [item for module in reorder(list(groups)) for cls in reorder(list(groups[module]))
                for item in reorder(groups[module][cls])]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tokenizer, student and teacher built from configs and saved, for from_pretrained to load."""
    from fl_sim.models_cli import build_default

    return build_default(tmp_path_factory.mktemp("models"), seed=0, pretrain_steps=0)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto on a free loopback port: password-less and ACL-free, for protocol tests."""
    broker = start_mosquitto(tmp_path / "mosquitto", "allow_anonymous true\n")
    yield broker
    broker.stop()
