from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from shared import topics
from shared.config import from_dict, load_file, require
from shared.errors import ConfigError, SchemaError
from shared.profiles import DeviceProfile, list_profiles, load_profile
from shared.wire import publish_packet_size


@dataclass(frozen=True)
class Inner:
    x: int = 1


@dataclass(frozen=True)
class Cfg:
    name: str
    rate: float = 0.5
    tags: tuple[str, ...] = ()
    inner: Inner = Inner()
    opt: str | None = None

    def __post_init__(self) -> None:
        require(0 < self.rate <= 1, f"rate must be in (0, 1], got {self.rate}")


def test_from_dict_builds_typed_frozen_config() -> None:
    c = from_dict(Cfg, {"name": "a", "rate": 1, "tags": ["x", "y"], "inner": {"x": 3}})
    assert c == Cfg("a", 1.0, ("x", "y"), Inner(3))
    assert isinstance(c.rate, float)


@pytest.mark.parametrize(("data", "match"), [
    ({"name": "a", "colour": 1}, r"unknown key\(s\) \['colour'\]"),
    ({"name": 3}, r"Cfg\.name: expected str, got 3"),
    ({"name": "a", "rate": 2.0}, "rate must be in"),
    ({"name": "a", "rate": True}, "expected float"),
    ({}, "missing required"),
    ({"name": "a", "inner": {"y": 1}}, r"Cfg\.inner: unknown key"),
    ({"name": "a", "tags": [1]}, "tags"),
])
def test_from_dict_rejects_with_a_clear_message(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        from_dict(Cfg, data)


def test_load_file_reports_bad_syntax(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_file(Cfg, p)


def test_every_shipped_profile_loads() -> None:
    names = list_profiles()
    assert {"cpu-dev", "orin-nano-8gb", "orin-nx-16gb", "agx-orin-32gb", "agx-orin-64gb", "xavier-nx"} <= set(names)
    for n in names:
        assert load_profile(n).name == n


def test_profile_unknown_and_bad(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known profiles"):
        load_profile("toaster")
    src = (Path(__file__).parents[2] / "firmware_profiles" / "cpu-dev.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(src.replace("batch_size = 8", "batch_size = 0"))
    with pytest.raises(ConfigError, match="batch_size"):
        load_profile(str(bad))
    bad.write_text(src + "\nquantization = 4\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_file(DeviceProfile, bad)


def test_topics_build_and_parse() -> None:
    assert topics.up("dev-1", "update") == "flm/v1/up/dev-1/update"
    assert topics.parse("flm/v1/up/dev-1/update") == topics.Topic("up", "dev-1", "update")
    assert topics.parse(topics.bcast("shutdown")) == topics.Topic("bcast", None, "shutdown")
    assert topics.parse(topics.down("d", "round")).device_id == "d"
    for bad in ("flm/v2/up/d/update", "flm/v1/up/d/x/y", "flm/v1/side/d/update", "other"):
        with pytest.raises(SchemaError):
            topics.parse(bad)
    for bad_id in ("a/b", "+", "#", "", "x" * 65):
        with pytest.raises(ValueError):
            topics.up(bad_id, "update")


def test_publish_packet_size_matches_mqtt_framing() -> None:
    # 1 fixed header + 1 length byte + (2 + 3 topic + 2 packet id) + 10 payload
    assert publish_packet_size("a/b", 10, qos=1) == 19
    assert publish_packet_size("a/b", 10, qos=0) == 17
    # remaining length 7 + 193 = 200 needs a 2-byte varint
    assert publish_packet_size("a/b", 193, qos=1) == 1 + 2 + 200
    # MQTT 5 adds a properties-length byte (no properties)
    assert publish_packet_size("a/b", 10, qos=1, mqtt5=True) == 20
