"""The aggregator's operations endpoint: Prometheus series and a health check.

Each aggregator owns its registry (not prometheus_client's global one), so several can run in one
process (the tests do). With ``metrics_port`` set, one small HTTP thread serves ``/metrics`` (the
Prometheus text format) and ``/healthz`` (JSON: the round, its stage, the last round's outcome and
the seconds since the last progress; 503 while a stage is stuck past its deadline or the broker
link is down).

Labels are bounded: a reason is mapped to a short fixed category (``*_CATEGORIES``), a rejected
message to its error type's name; never raw text or a device id, so the number of series does not
grow with the fleet or with what devices write.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from shared import topics
from shared.errors import ConfigError

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "abandoned", "interrupted")  # a recorded round's status (the round-0 baseline is not a round)
# A stage past its deadline by more than this is stuck: collection returns at its deadline, so
# only a hang (a blocked publish, a wedged decrypt) keeps it there this long.
STUCK_AFTER_S = 60.0
# (words, category): the first entry whose words the text contains wins; the rest is "other".
# Drop reasons are ours (aggregator.collect, aggregator.secure_round) and start with their words;
# decline details are the devices' (edge_client.client), matched anywhere in the text.
DROP_CATEGORIES = (("declined", "declined"), ("offline", "offline"), ("rejected", "rejected"), ("restarted", "restarted"),
                   ("straggler", "straggler"), ("no ", "timeout"), ("withheld", "withheld"), ("not in the sum", "not_in_sum"))
DECLINE_CATEGORIES = (("secure aggregation aborted", "secagg_aborted"), ("epsilon", "privacy"), ("noise", "privacy"),
                      ("stale base", "stale_base"), ("memory", "memory"), ("cannot score", "scoring"), ("refused", "refused"))
DEVICE_BUCKETS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
LONG_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)


def category(text: str, table: tuple[tuple[str, str], ...]) -> str:
    """A reason's label: ``table``'s category for it (by its start for drop reasons, anywhere for declines)."""
    low = text.lower()
    anywhere = table is DECLINE_CATEGORIES
    return next((cat for words, cat in table if (words in low if anywhere else low.startswith(words))), "other")


class Metrics:
    """The series, and the small state ``/healthz`` reports. The hooks are one call each."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.rounds = Counter("flm_rounds", "Rounds recorded, by outcome (ok, abandoned, interrupted)", ["outcome"], registry=r)
        self.round_devices = Histogram("flm_round_devices", "Devices per round: invited, received (in the aggregate), dropped",
                                       ["role"], buckets=DEVICE_BUCKETS, registry=r)
        self.last_round_devices = Gauge("flm_last_round_devices", "The last recorded round's devices, by role", ["role"], registry=r)
        self.wire_bytes = Counter("flm_wire_bytes", "MQTT PUBLISH bytes (header, topic, payload), by direction and kind",
                                  ["direction", "kind"], registry=r)
        self.dropouts = Counter("flm_dropouts", "Invited devices that did not end in a round's aggregate, by reason",
                                ["reason"], registry=r)
        self.declined = Counter("flm_declined_messages", "Declined statuses from devices, by reason", ["reason"], registry=r)
        self.rejected = Counter("flm_rejected_messages", "Messages rejected on receipt, by error type", ["reason"], registry=r)
        self.stage_seconds = Histogram("flm_stage_seconds", "Wall time of a round stage (collection stages and unmasking)",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.round_seconds = Histogram("flm_round_seconds", "Wall time of a round, plan to evaluation", buckets=LONG_BUCKETS,
                                       registry=r)
        self.distil_seconds = Histogram("flm_distil_seconds", "Wall time of a round's distillation on the aggregator",
                                        buckets=LONG_BUCKETS, registry=r)
        self.releases = Counter("flm_releases", "Signed releases announced, by kind (release, rollback)", ["kind"], registry=r)
        self.deliveries = Counter("flm_release_deliveries", "Per-device answers to a release (installed, refused, no_answer)",
                                  ["outcome"], registry=r)
        self.round_gauge = Gauge("flm_round", "The round under way, or the last one", registry=r)
        self.online = Gauge("flm_devices_online", "Enrolled devices whose last status said online", registry=r)
        for o in OUTCOMES:  # present at 0 from the start, so a rate over them is defined
            self.rounds.labels(o)
        for k in ("release", "rollback"):
            self.releases.labels(k)
        # /healthz
        self._lock = threading.Lock()
        self.round = 0
        self.stage_now = "starting"
        self.deadline: float | None = None  # monotonic; None: the current stage has none
        self.last_outcome: str | None = None
        self.progress_at = time.monotonic()

    # -- hooks -----------------------------------------------------------------------------------
    def progress(self, stage: str | None = None, timeout_s: float | None = None) -> None:
        """Something moved; with ``stage``, the loop entered it (``timeout_s``: its deadline)."""
        with self._lock:
            self.progress_at = time.monotonic()
            if stage is not None:
                self.stage_now = stage
                self.deadline = None if timeout_s is None else self.progress_at + timeout_s

    @contextmanager
    def stage(self, name: str, timeout_s: float | None = None) -> Iterator[None]:
        """Time a stage into ``flm_stage_seconds``; /healthz shows it while it runs."""
        self.progress(name, timeout_s)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.stage_seconds.labels(name).observe(time.monotonic() - t0)
            self.progress(f"{name} done")

    def round_started(self, rnd: int) -> None:
        with self._lock:
            self.round = rnd
        self.round_gauge.set(rnd)
        self.progress("plan")

    def wire(self, direction: str, topic_or_kind: str, n: int) -> None:
        """Bytes in (a received topic: its kind, if one of ours) or out (the kind sent)."""
        if direction == "in":
            self.progress_at = time.monotonic()  # a message arrived: the loop is reading
        kind = topic_or_kind.rsplit("/", 1)[-1]
        self.wire_bytes.labels(direction, kind if kind in topics.UP_KINDS or direction == "out" else "other").inc(n)

    def reject(self, e: BaseException) -> None:
        self.rejected.labels(type(e).__name__).inc()

    def decline(self, detail: str) -> None:
        self.declined.labels(category(detail, DECLINE_CATEGORIES)).inc()

    def released(self, kind: str) -> None:
        self.releases.labels(kind).inc()

    def delivered(self, delivery: dict[str, Any]) -> None:
        for outcome in ("installed", "refused", "no_answer"):
            self.deliveries.labels(outcome).inc(len(delivery.get(outcome, ())))

    def observe_round(self, rec: Any) -> None:
        """A round's record (aggregator.record.RoundRecord), as it is written."""
        if rec.status not in OUTCOMES:
            return  # the baseline evaluation
        self.rounds.labels(rec.status).inc()
        for role, devs in (("invited", rec.participants), ("received", rec.received), ("dropped", rec.dropped)):
            self.round_devices.labels(role).observe(len(devs))
            self.last_round_devices.labels(role).set(len(devs))
        for why in rec.drop_reasons.values():
            self.dropouts.labels(category(why, DROP_CATEGORIES)).inc()
        if rec.time_s:
            self.round_seconds.observe(rec.time_s)
        if rec.distil and "seconds" in rec.distil:
            self.distil_seconds.observe(float(rec.distil["seconds"]))
        with self._lock:
            self.round = max(self.round, rec.round)
            self.last_outcome = rec.status
        self.round_gauge.set(self.round)
        self.progress("recorded")

    # -- /healthz --------------------------------------------------------------------------------
    def health(self, link: Any) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body): 503 while a stage is past its deadline by STUCK_AFTER_S, or the link is down."""
        now = time.monotonic()
        with self._lock:
            body: dict[str, Any] = {"round": self.round, "stage": self.stage_now, "last_outcome": self.last_outcome,
                                    "seconds_since_progress": round(now - self.progress_at, 3)}
            late = 0.0 if self.deadline is None else now - self.deadline
        problems = [f"stage {body['stage']!r} is {late:.0f} s past its deadline"] if late > STUCK_AFTER_S else []
        # No link yet: the models are loading, before the first connect (a failed one ends the process).
        body["broker_link"] = "not connected yet" if link is None else "up" if getattr(link, "connected", True) else "down"
        if body["broker_link"] == "down":
            problems.append("the broker link is down")
        body["status"] = "unhealthy" if problems else "ok"
        if problems:
            body["problems"] = problems
        return (503 if problems else 200), body


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a scraper that hangs up mid-request does not hold the process at exit


class _Server6(_Server):
    address_family = socket.AF_INET6


class OpsServer:
    """``/metrics`` and ``/healthz`` on one ThreadingHTTPServer in a daemon thread."""

    def __init__(self, host: str, port: int, metrics: Metrics, link: Callable[[], Any]) -> None:
        m = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
                    self._send(200, ctype, encoder(m.registry))
                elif path == "/healthz":
                    code, body = m.health(link())
                    self._send(code, "application/json", json.dumps(body).encode() + b"\n")
                else:
                    self._send(404, "text/plain", b"/metrics or /healthz\n")

            def _send(self, code: int, ctype: str, data: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
                log.debug("%s %s", self.address_string(), format % args)

        server = _Server6 if ":" in host else _Server
        try:
            self.httpd = server((host, port), Handler)
        except OSError as e:
            raise ConfigError(f"metrics_host:metrics_port {host}:{port}: cannot listen there: {e.strerror or e}") from None
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fl-agg-ops", daemon=True)
        self.thread.start()
        log.info("metrics on http://%s:%d/metrics, health on /healthz", host, self.port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
