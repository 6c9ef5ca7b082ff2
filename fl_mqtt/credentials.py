"""A broker login file: what ``fl-agg broker-config`` writes for each client
(``credentials/<user>.json``, mode 0600) and what a device's or the aggregator's config names as
``credentials`` instead of writing the password into the config itself.

The file records the CA certificate's path on the machine that wrote it; on a device the CA lives
elsewhere, so a config's own ``ca_file`` takes precedence (``login``).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ConfigError

log = logging.getLogger(__name__)

CREDENTIALS_FORMAT = "flm-mqtt-credentials"
CREDENTIALS_VERSION = 1


@dataclass(frozen=True)
class MqttCredentials:
    """One client's connection settings, as written to ``credentials/<user>.json``."""

    username: str
    password: str = field(repr=False)
    host: str
    port: int
    tls: bool
    ca_file: str | None

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": CREDENTIALS_FORMAT,
                "version": CREDENTIALS_VERSION,
                "username": self.username,
                "password": self.password,
                "host": self.host,
                "port": self.port,
                "tls": self.tls,
                "ca_file": self.ca_file,
            },
            indent=2,
        ) + "\n"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MqttCredentials:
        try:
            obj = json.loads(Path(path).read_text())
        except ValueError as exc:
            raise ConfigError(f"{path}: not JSON: {exc}") from None
        keys = {"format", "version", "username", "password", "host", "port", "tls", "ca_file"}
        if not isinstance(obj, dict) or obj.get("format") != CREDENTIALS_FORMAT or set(obj) != keys:
            raise ConfigError(f"{path}: not a {CREDENTIALS_FORMAT} file with fields {sorted(keys)}")
        if obj["version"] != CREDENTIALS_VERSION:
            raise ConfigError(f"{path}: version {obj['version']!r} is not {CREDENTIALS_VERSION}")
        return cls(
            username=str(obj["username"]),
            password=str(obj["password"]),
            host=str(obj["host"]),
            port=int(obj["port"]),
            tls=bool(obj["tls"]),
            ca_file=obj["ca_file"],
        )


def login(path: str | os.PathLike[str], username: str | None, password: str | None,
          ca_file: str | None) -> tuple[str | None, str | None, str | None]:
    """(username, password, ca_file) for a link: from the login file at ``path`` when one is
    configured (a config's own ``ca_file`` wins), else the config's own fields."""
    if not path:
        return username, password, ca_file
    if username or password:
        raise ConfigError("give either credentials (the login file) or username/password, not both")
    try:
        mode = stat.S_IMODE(Path(path).stat().st_mode)
    except OSError as e:
        raise ConfigError(f"cannot read the broker login file {path}: {e.strerror}") from None
    if mode & 0o077:
        # Not fatal: the file may be on a filesystem without modes; but a password others can read is not a secret.
        log.warning("%s holds a broker password and has mode %04o: chmod 600 it", path, mode)
    c = MqttCredentials.load(path)
    return c.username, c.password, ca_file or c.ca_file
