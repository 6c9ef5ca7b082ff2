"""The broker login file a config names as ``credentials`` (fl_mqtt.credentials)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from edge_client.config import EdgeConfig
from fl_mqtt.credentials import MqttCredentials, login
from shared.errors import ConfigError


def _file(tmp_path: Path, mode: int = 0o600) -> Path:
    p = tmp_path / "device-1.json"
    p.write_text(MqttCredentials("device-1", "s3cret", "broker.example", 8883, True, "/operator/broker/ca.crt").to_json())
    os.chmod(p, mode)
    return p


def test_the_login_file_gives_user_and_password_and_a_configs_ca_wins(tmp_path: Path) -> None:
    p = _file(tmp_path)
    assert login(str(p), None, None, None) == ("device-1", "s3cret", "/operator/broker/ca.crt")
    assert login(str(p), None, None, "/home/me/fl/ca.crt") == ("device-1", "s3cret", "/home/me/fl/ca.crt")
    assert login("", "u", "p", "ca") == ("u", "p", "ca")  # no file: the config's own fields
    cfg = EdgeConfig(device_id="device-1", broker="mqtts://b:8883", data="d", student="s", credentials=str(p), ca_file="/x/ca.crt",
                     insecure=True)
    assert cfg.mqtt_login() == ("device-1", "s3cret", "/x/ca.crt")


def test_both_a_file_and_a_password_is_refused_and_a_bad_file_is_named(tmp_path: Path) -> None:
    p = _file(tmp_path)
    with pytest.raises(ConfigError, match="not both"):
        EdgeConfig(device_id="device-1", broker="mqtts://b:8883", data="d", student="s", credentials=str(p), password="x",
                   insecure=True)
    with pytest.raises(ConfigError, match="cannot read the broker login file"):
        login(str(tmp_path / "missing.json"), None, None, None)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match="not a flm-mqtt-credentials file"):
        login(str(bad), None, None, None)


def test_a_login_file_others_can_read_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = _file(tmp_path, 0o644)
    with caplog.at_level(logging.WARNING):
        login(str(p), None, None, None)
    assert "mode 0644" in caplog.text and "chmod 600" in caplog.text
