"""Can this machine reach the broker, and does its TLS verify? (``fl-edge doctor``, ``fl-agg doctor``)

A TCP connect, then (for ``mqtts://``) a TLS handshake against the configured CA, with the CA
certificate's validity window held against this machine's clock first: a clock that is behind
shows up as "certificate is not yet valid" in every TLS error, and naming it saves a search.
No MQTT login: the broker keeps one session per account, and logging in as a running client
would take its session over.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from urllib.parse import urlparse


def ca_window_problem(ca_file: str | Path, now: float | None = None) -> str | None:
    """Why the CA certificate is not valid on this clock, or None."""
    from shared.crypto import certificate_windows

    now = time.time() if now is None else now
    for start, end in certificate_windows(Path(ca_file).read_bytes()):
        if now < start:
            return f"its CA certificate is not valid until {time.strftime('%Y-%m-%d %H:%M', time.gmtime(start))} UTC: this clock is behind"
        if now > end:
            return f"its CA certificate expired on {time.strftime('%Y-%m-%d %H:%M', time.gmtime(end))} UTC (or this clock is ahead)"
    return None


def broker_problem(url: str, ca_file: str | None, timeout: float, now: float | None = None) -> tuple[str | None, str]:
    """(why the broker cannot be used, or None; what was checked, for the verdict line)."""
    u = urlparse(url)
    host, port = u.hostname or "", u.port or (8883 if u.scheme == "mqtts" else 1883)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} unreachable: {e}", ""
    if u.scheme != "mqtts":
        return None, f"{host}:{port} reachable, NO TLS"
    if ca_file:
        why = ca_window_problem(ca_file, now)
        if why:
            return f"{ca_file}: {why}", ""
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, ctx.wrap_socket(raw, server_hostname=host):
            pass
    except (ssl.SSLError, OSError) as e:
        return (f"TLS to {host}:{port} fails: {e}" +
                (" (the broker's certificate is not from this CA)" if "verify failed" in str(e) else "")), ""
    return None, f"{host}:{port} reachable, TLS verified against {ca_file or 'the system CAs'}"
