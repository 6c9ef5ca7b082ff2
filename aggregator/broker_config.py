"""Write a locked-down Mosquitto 2.x configuration for one federation.

``write_broker_config(out_dir, device_ids)`` writes, under ``out_dir``:

- ``ca.crt`` / ``ca.key`` (0600): a private CA (ECDSA P-256, via ``shared.crypto.make_server_tls``); keep
  ``ca.key`` offline or delete it if you will never re-issue the server certificate.
- ``server.crt`` / ``server.key`` (0600): the broker's certificate for ``host``, ``localhost`` and
  ``127.0.0.1``.
- ``passwd`` (0600): one random password per device and one for the aggregator, hashed in
  Mosquitto 2.0's own ``$7$`` format (PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt), the
  format ``mosquitto_passwd`` writes and every 2.x broker reads. We hash in-process rather than
  shelling out to ``mosquitto_passwd``: it need not be installed where the config is generated,
  and a newer one may default to a hash an older broker cannot read.
- ``acl``: explicit per-user rules (no ``pattern`` lines, which would also apply to the aggregator's
  account): device D writes only ``flm/v1/up/D/KIND`` for the protocol's upload kinds
  (``shared.topics.UP_KINDS``: status, update, chunk, secagg) and reads only ``flm/v1/down/D/#``
  and ``flm/v1/bcast/#``; the aggregator reads ``flm/v1/up/#``, writes ``flm/v1/down/#`` and
  ``flm/v1/bcast/#``, and writes the upload kinds other than status (``flm/v1/up/+/update`` ...),
  only to clear retained messages there. Anything not granted is denied.
- ``credentials/<device>.json`` and ``credentials/<aggregator_user>.json`` (0600): what one client
  needs to connect (schema below); a device config points at its file.
- ``mosquitto.conf``: a complete config with its own ``listener PORT HOST`` line.

``BrokerFiles.body`` is the same config *without* a listener line: append it right after your own
``listener`` line (``tests.brokers.start_mosquitto`` writes ``listener PORT 127.0.0.1`` and then the
body). Its TLS options (``cafile``/``certfile``/``keyfile``/``tls_version``) are listener options,
so they apply to the listener declared just before them; ``allow_anonymous``, ``password_file`` and
``acl_file`` are global (we rely on Mosquitto's default ``per_listener_settings false``).
With ``tls=True`` that listener speaks TLS only: plaintext clients cannot connect.

Credentials JSON (``format: "flm-mqtt-credentials"``, ``version: 1``)::

    {"format", "version", "username", "password", "host", "port", "tls", "ca_file"}

``ca_file`` is an absolute path (or null when ``tls`` is false). Clients must verify the server
certificate against it (paho: ``tls_set(ca_certs=ca_file)``).

Privileges: Mosquitto started as root drops to the ``mosquitto`` account *before* reading the
password file and keys. So ``broker_user`` is written as the config's ``user`` option and, when we
run as root, the files the broker reads are chowned to it. Left as None: as root we write
``user root`` (the broker then keeps root and can read our 0600 files; fine for tests and local
runs, and Mosquitto logs a warning); as another user we write nothing and the broker, started by
that same user, reads its own files.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from fl_mqtt.credentials import MqttCredentials  # noqa: F401  (written here, read by both sides)
from shared import topics
from shared.crypto import make_server_tls
from shared.errors import ConfigError

log = logging.getLogger(__name__)

# Mosquitto 2.0's mosquitto_passwd: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt, 64-byte hash.
PASSWD_ITERATIONS = 101
PASSWD_SALT_LEN = 12
TLS_MIN_VERSION = "tlsv1.2"
MESSAGE_SLACK = 16 * 1024  # chunk frame, envelope and signature around a chunk's bytes
MAX_QUEUED_BYTES = 64 << 20  # what the broker holds for one absent client (a round's downloads fit)
# What Mosquitto 2.0 can and cannot cap (its mosquitto.conf(5), and src/database.c, retain.c):
# - max_queued_messages / max_queued_bytes are per client (one value for every client) and count a
#   client's outgoing QoS 1 queue beyond its in-flight window, online or absent; retained messages
#   replayed on a subscription go through that same queue, so a replay beyond the cap is dropped
#   for that subscriber. With use_username_as_clientid each account has exactly one session, so
#   the broker holds at most (accounts) x (in-flight window + MAX_QUEUED_BYTES) of queues.
# - Nothing caps retained messages per client, by count or bytes (2.0.11 has no such option;
#   retain_available false would also drop the devices' retained presence). What bounds them is
#   the ACL: a device writes exactly topics.UP_KINDS under its own prefix, so it holds at most
#   that many retained messages, each within message_size_limit; the aggregator clears all but
#   the status. memory_limit is the broker's global heap cap, not per client: not set here.


# --- Mosquitto password hashes -------------------------------------------------------------------


def mosquitto_password_hash(password: str, *, salt: bytes | None = None, iterations: int = PASSWD_ITERATIONS) -> str:
    """Return ``$7$ITER$B64SALT$B64HASH`` as ``mosquitto_passwd`` (2.0) writes it."""
    if salt is None:
        salt = secrets.token_bytes(PASSWD_SALT_LEN)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_mosquitto_password(password: str, encoded: str) -> bool:
    """Check ``password`` against a ``$7$`` hash (used to cross-check with ``mosquitto_passwd``)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7":
        raise ValueError(f"not a Mosquitto $7$ hash: {encoded!r}")
    iterations = int(parts[2])
    salt = base64.b64decode(parts[3], validate=True)
    expected = base64.b64decode(parts[4], validate=True)
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return hmac.compare_digest(got, expected)


# --- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerFiles:
    """Paths and text written by ``write_broker_config``."""

    out_dir: Path
    conf_path: Path  # complete config, with its own ``listener`` line
    body: str  # the config without a listener line (see module docstring)
    password_file: Path
    acl_file: Path
    ca_cert: Path | None
    ca_key: Path | None
    server_cert: Path | None
    server_key: Path | None
    credentials: Mapping[str, Path]  # device id -> credentials JSON
    aggregator_credentials: Path
    observer_credentials: Mapping[str, Path]  # read-only accounts (auditors) -> credentials JSON
    aggregator_user: str
    host: str
    port: int
    tls: bool


# --- helpers ---------------------------------------------------------------------------------------


def _write(path: Path, data: str | bytes, mode: int) -> Path:
    """Write atomically with ``mode`` set from creation (secrets never exist under a looser mode)."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _acl_text(device_ids: list[str], aggregator_user: str, observers: list[str] = ()) -> str:  # type: ignore[assignment]
    p = topics.PREFIX
    lines = [
        "# Written by aggregator.broker_config. Explicit per-user rules only: anything not granted",
        "# here is denied. No `pattern` lines, because those would apply to the aggregator too.",
        "",
        f"user {aggregator_user}",
        f"topic read {p}/{topics.UP}/#",
        f"topic write {p}/{topics.DOWN}/#",
        f"topic write {topics.bcast_filter()}",
        # To clear what a device leaves retained on its non-presence topics (aggregator.collect):
        # Mosquitto cannot grant "empty retained messages only", so this is write access to those
        # topics, whose only reader is the aggregator itself (and observers, who check the
        # devices' signatures). Never the presence topics: a device's status is its own.
        *(f"topic write {p}/{topics.UP}/+/{kind}" for kind in topics.UP_KINDS if kind != topics.PRESENCE),
    ]
    for obs in observers:  # read-only: an auditor sees what the broker sees, and can send nothing
        lines += ["", f"user {obs}", f"topic read {p}/{topics.UP}/#", f"topic read {p}/{topics.DOWN}/#",
                  f"topic read {topics.bcast_filter()}"]
    for dev in device_ids:
        # Exactly the protocol's upload topics, not ``up/DEV/#``: a device cannot park retained
        # messages on subtopics of its own choosing (at most one retained message per kind).
        lines += ["", f"user {dev}", *(f"topic write {topics.up(dev, kind)}" for kind in topics.UP_KINDS),
                  f"topic read {topics.down_filter(dev)}", f"topic read {topics.bcast_filter()}"]
    return "\n".join(lines) + "\n"


def _resolve_broker_user(broker_user: str | None) -> tuple[str | None, tuple[int, int] | None]:
    """Return (value for the ``user`` option or None, (uid, gid) to chown broker-read files to)."""
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if broker_user is None:
        if is_root:
            log.warning(
                "generating as root: writing `user root` so Mosquitto can read the 0600 files; "
                "pass broker_user='mosquitto' for a deployment"
            )
            return "root", None
        return None, None
    if is_root and broker_user != "root":
        import pwd  # POSIX only, and only needed here

        try:
            pw = pwd.getpwnam(broker_user)
        except KeyError:
            raise ConfigError(f"broker_user {broker_user!r} does not exist on this machine") from None
        return broker_user, (pw.pw_uid, pw.pw_gid)
    return broker_user, None


# --- main entry ------------------------------------------------------------------------------------


def write_broker_config(
    out_dir: str | os.PathLike[str],
    device_ids: Iterable[str],
    *,
    aggregator_user: str = "aggregator",
    tls: bool = True,
    port: int = 8883,
    host: str = "127.0.0.1",
    broker_user: str | None = None,
    cert_days: int = 825,
    chunk_bytes: int = 256 * 1024,
    force: bool = False,
    observers: Iterable[str] = (),
) -> BrokerFiles:
    """Write CA + server certificate (if ``tls``), password file, ACL, per-client credentials and
    a Mosquitto config under ``out_dir``. Returns the paths; see the module docstring.

    Every call generates new passwords (and certificates), so it refuses to write over an existing
    config unless ``force``: a re-run would silently replace the CA key and lock every device out
    until it gets its new credentials.
    """
    devices = [topics.check_device_id(d) for d in device_ids]
    if len(set(devices)) != len(devices):
        raise ConfigError(f"duplicate device ids in {devices}")
    try:
        topics.check_device_id(aggregator_user)
    except ValueError as exc:
        raise ConfigError(f"aggregator_user: {exc}") from None
    if aggregator_user in devices:
        raise ConfigError(f"device id {aggregator_user!r} collides with the aggregator's username")
    obs = [topics.check_device_id(o) for o in observers]
    if set(obs) & ({aggregator_user} | set(devices)) or len(set(obs)) != len(obs):
        raise ConfigError(f"observer names {obs} repeat or collide with the aggregator or a device")
    if not 0 < port < 65536:
        raise ConfigError(f"port {port} is not a TCP port")
    if any(c.isspace() for c in host) or not host:
        raise ConfigError(f"host {host!r} is not a host name or address")

    out = Path(out_dir).resolve()
    existing = [p.name for p in (out / "mosquitto.conf", out / "passwd", out / "ca.key") if p.exists()]
    if existing and not force:
        raise ConfigError(f"{out} already holds a broker config ({', '.join(existing)}); writing again replaces the CA "
                          f"key and every password. Pass --force to do that")
    if chunk_bytes < 4096:
        raise ConfigError(f"chunk_bytes {chunk_bytes} is below 4096")
    out.mkdir(parents=True, exist_ok=True)
    cred_dir = out / "credentials"
    cred_dir.mkdir(mode=0o700, exist_ok=True)
    user_opt, chown_to = _resolve_broker_user(broker_user)
    broker_read: list[Path] = []  # files Mosquitto itself opens (chowned when we run as root)
    data_dir = out / "data"  # the broker's persistence (sessions, queued messages)
    data_dir.mkdir(mode=0o700, exist_ok=True)
    (data_dir / "mosquitto.db").unlink(missing_ok=True)  # the old accounts' sessions go with their passwords
    broker_read.append(data_dir)

    ca_cert = ca_key = server_cert = server_key = None
    if tls:
        material = make_server_tls(host, days=cert_days)
        ca_cert = _write(out / "ca.crt", material.ca_cert_pem, 0o644)
        ca_key = _write(out / "ca.key", material.ca_key_pem, 0o600)
        server_cert = _write(out / "server.crt", material.server_cert_pem, 0o644)
        server_key = _write(out / "server.key", material.server_key_pem, 0o600)
        broker_read += [ca_cert, server_cert, server_key]

    passwords = {user: secrets.token_urlsafe(24) for user in [aggregator_user, *devices, *obs]}
    password_file = _write(
        out / "passwd",
        "".join(f"{user}:{mosquitto_password_hash(pw)}\n" for user, pw in passwords.items()),
        0o600,
    )
    acl_file = _write(out / "acl", _acl_text(devices, aggregator_user, obs), 0o644)
    broker_read += [password_file, acl_file]

    creds: dict[str, Path] = {}
    for user, pw in passwords.items():
        c = MqttCredentials(
            username=user, password=pw, host=host, port=port, tls=tls, ca_file=str(ca_cert) if ca_cert else None
        )
        creds[user] = _write(cred_dir / f"{user}.json", c.to_json(), 0o600)

    body_lines = [
        "# Written by aggregator.broker_config. No `listener` line here: the TLS options below",
        "# apply to the listener declared just before this text. The rest is global",
        "# (Mosquitto's default per_listener_settings false).",
        "allow_anonymous false",
        f"password_file {password_file}",
        f"acl_file {acl_file}",
        # A client is always the account it logged in as: one device's credentials cannot take
        # over another's client id (or the aggregator's) and kick it off the broker.
        "use_username_as_clientid true",
        # Every protocol message is at most one chunk plus its frame: bigger ones are dropped at
        # the broker, not delivered for the aggregator to buffer.
        f"message_size_limit {chunk_bytes + MESSAGE_SLACK}",
        # Sessions outlive an outage: clients ask for a session expiry (fl_mqtt.link), so the
        # broker keeps their subscriptions and queues QoS 1 messages while they are away, and
        # persistence keeps both, with the queued messages, across a broker restart (written on
        # shutdown and every 10 s). The queue is bounded per client so an absent client costs
        # the broker at most that much.
        "persistence true",
        f"persistence_location {data_dir}/",
        "autosave_interval 10",
        "max_queued_messages 2000",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        # Retained messages are replayed only while their publisher may still write the topic, so
        # one left on a topic the ACL no longer grants (an older, wider ACL, kept by persistence)
        # is never delivered. Mosquitto's default, written out because the protocol relies on it.
        "check_retain_source true",
    ]
    if user_opt is not None:
        body_lines.append(f"user {user_opt}")
    if tls:
        body_lines += [
            f"cafile {ca_cert}",
            f"certfile {server_cert}",
            f"keyfile {server_key}",
            f"tls_version {TLS_MIN_VERSION}",
            "require_certificate false",
        ]
    body = "\n".join(body_lines) + "\n"
    conf_path = _write(out / "mosquitto.conf", f"listener {port} {host}\n" + body, 0o644)
    broker_read.append(conf_path)

    if chown_to is not None:
        for path in broker_read:
            os.chown(path, *chown_to)

    log.info(
        "wrote Mosquitto config for %d devices to %s (tls=%s, listener %s:%d)", len(devices), out, tls, host, port
    )
    return BrokerFiles(
        out_dir=out,
        conf_path=conf_path,
        body=body,
        password_file=password_file,
        acl_file=acl_file,
        ca_cert=ca_cert,
        ca_key=ca_key,
        server_cert=server_cert,
        server_key=server_key,
        credentials={d: creds[d] for d in devices},
        observer_credentials={o: creds[o] for o in obs},
        aggregator_credentials=creds[aggregator_user],
        aggregator_user=aggregator_user,
        host=host,
        port=port,
        tls=tls,
    )
