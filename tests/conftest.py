"""Fixtures shared by the test packages: tiny offline models and a real Mosquitto."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import Mosquitto, start_mosquitto

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub


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
