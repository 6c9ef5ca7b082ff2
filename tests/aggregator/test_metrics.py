"""The aggregator's /metrics and /healthz (issue 25): scraped over HTTP during and after rounds of
the real aggregator and edge clients (the in-process secure fleet, ``tests.secure_fleet``).

Round 1 completes, with a device that declines, a junk message, distillation (fedkd) and a release
every round; round 2 loses two devices and is abandoned; round 3 completes, and then a rollback to
round 1's release is announced. Each listed series must have moved.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared import topics
from tests.secure_fleet import build_fleet

pytestmark = pytest.mark.timeout(300)

N = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(port: int) -> dict[str, float]:
    """Every sample of /metrics as ``name{label="value",...}`` -> value."""
    code, body = _get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def healthz(port: int) -> tuple[int, dict]:
    code, body = _get(f"http://127.0.0.1:{port}/healthz")
    return code, json.loads(body)


def _loop_round(agg, rnd: int):  # type: ignore[no-untyped-def]
    """One turn of ``Aggregator.run``'s loop: the round, its release if due, its record."""
    agg.drain()  # devices revived by plan.start_round say they are online
    rec = agg.run_round(rnd)
    if agg._release_due(rnd, rec):
        rec = dataclasses.replace(rec, release=agg.release(rnd, rec))
    agg._record(agg.out / "metrics.jsonl", rec)
    return rec


@pytest.fixture(scope="module")
def fleet(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    from aggregator.config import DistilSettings, ReleaseConfig

    root = tmp_path_factory.mktemp("metrics_fleet")
    port = _free_port()
    fleet = build_fleet(tiny_models, root, n=N, secagg_threshold=3, mode="fedkd", teacher=tiny_models["teacher"],
                        public_data=str(root / "data" / "public" / "public.jsonl"),
                        distil=DistilSettings(batch_size=4, student_steps=2, teacher_steps=2),
                        release=ReleaseConfig(every=1), metrics_port=port)
    agg = fleet[0]
    agg.serve_ops()
    yield fleet, port
    agg.ops.close()


def test_each_series_moves_during_rounds_and_healthz_follows_the_loop(fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_client.budget import Declined

    (agg, edges, plan, root), port = fleet
    code, h = healthz(port)
    assert code == 200 and h["round"] == 0 and h["broker_link"] == "up", h
    before = scrape(port)
    assert before['flm_rounds_total{outcome="ok"}'] == 0  # present from the start, at zero

    # Round 1: device-3 declines after the key stages (as one out of memory would), and a junk
    # message arrives on device-0's update topic. /healthz is read while the update stage runs.
    def decline(spec, announcement=None):  # type: ignore[no-untyped-def]
        raise Declined(f"round {spec.round}: out of GPU memory at batch 4 (test)")

    monkeypatch.setattr(edges[3], "train_delta", decline)
    during: list[tuple[int, dict, dict[str, float]]] = []
    pump = agg.link.pump

    def pump_and_look() -> None:
        pump()
        if not during and agg.book is not None and agg.book.stage == "update":
            agg.link.bus.publish(topics.up("device-0", "update"), b"\x93junk")
            during.append((*healthz(port), scrape(port)))

    agg.link.pump = pump_and_look
    plan.start_round({}, edges)
    rec1 = _loop_round(agg, 1)
    agg.link.pump = pump
    monkeypatch.undo()
    assert rec1.status == "ok" and rec1.received == ["device-0", "device-1", "device-2"], rec1.abandon_reason
    assert rec1.release and rec1.release["published"], rec1.release
    code, h, mid = during[0]
    assert code == 200 and h["round"] == 1 and h["stage"] == "update" and h["seconds_since_progress"] < 30, h
    assert mid['flm_stage_seconds_count{stage="advertise"}'] == 1 and 'flm_stage_seconds_count{stage="update"}' not in mid
    assert mid["flm_round"] == 1

    # Round 2: two devices die before sending their masked input: 2 survivors, below t = 3.
    plan.start_round({"device-1": "masked", "device-2": "masked"}, edges)
    rec2 = _loop_round(agg, 2)
    assert rec2.status == "abandoned", rec2
    # Round 3 completes and is released; then the operator rolls back to round 1's release.
    plan.start_round({}, edges)
    rec3 = _loop_round(agg, 3)
    assert rec3.status == "ok" and rec3.release["published"], rec3.release
    from aggregator import release as rel

    rel.request_rollback(agg.out / "releases", rec1.release["release_id"], "test", agg.release_key.public, agg.cfg.release.fleet)
    assert agg.rollback_if_requested() is not None

    after = scrape(port)

    def moved(key: str, by: float = 1.0) -> None:
        assert after.get(key, 0.0) - before.get(key, 0.0) >= by, (key, before.get(key), after.get(key))

    moved('flm_rounds_total{outcome="ok"}', 2)
    moved('flm_rounds_total{outcome="abandoned"}', 1)
    moved('flm_round_devices_count{role="invited"}', 3)
    moved('flm_round_devices_sum{role="invited"}', 3 * N)
    moved('flm_round_devices_sum{role="received"}', 3 + N)
    assert after['flm_last_round_devices{role="received"}'] == N
    for kind in ("status", "secagg", "update"):  # masked updates this small go unchunked
        moved(f'flm_wire_bytes_total{{direction="in",kind="{kind}"}}', 100)
    for kind in ("round", "secagg", "release"):
        moved(f'flm_wire_bytes_total{{direction="out",kind="{kind}"}}', 100)
    moved('flm_dropouts_total{reason="declined"}')
    moved('flm_dropouts_total{reason="offline"}', 2)
    moved('flm_declined_messages_total{reason="memory"}')
    assert any(k.startswith("flm_rejected_messages_total") and v >= 1 for k, v in after.items()), after
    for stage in ("advertise", "reveal", "share", "receipt", "update", "consistency", "unmask", "unmask_sum"):
        moved(f'flm_stage_seconds_count{{stage="{stage}"}}', 2)
    moved("flm_round_seconds_count", 3)
    moved("flm_distil_seconds_count", 2)
    assert after["flm_distil_seconds_sum"] > 0
    moved('flm_releases_total{kind="release"}', 2)
    moved('flm_releases_total{kind="rollback"}')
    moved('flm_release_deliveries_total{outcome="installed"}', 2 * N)
    assert after["flm_devices_online"] == N and after["flm_round"] == 3
    code, h = healthz(port)
    assert code == 200 and h["round"] == 3 and h["last_outcome"] == "ok" and h["status"] == "ok", h


def test_healthz_is_503_when_a_stage_is_stuck_or_the_link_is_down(fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    from aggregator import metrics

    (agg, *_), port = fleet
    monkeypatch.setattr(agg.link, "connected", False, raising=False)
    code, h = healthz(port)
    assert code == 503 and h["broker_link"] == "down" and h["problems"] == ["the broker link is down"], h
    monkeypatch.setattr(agg.link, "connected", True, raising=False)
    monkeypatch.setattr(metrics, "STUCK_AFTER_S", 0.0)
    agg.metrics.progress("unmask", timeout_s=-1.0)  # entered a stage whose deadline has passed
    code, h = healthz(port)
    assert code == 503 and h["stage"] == "unmask" and "past its deadline" in h["problems"][0], h
    agg.metrics.progress("recorded")
    assert healthz(port)[0] == 200
    assert _get(f"http://127.0.0.1:{port}/nothing")[0] == 404


def test_a_port_in_use_is_one_config_error(fleet) -> None:
    from aggregator.metrics import OpsServer
    from shared.errors import ConfigError

    (agg, *_), port = fleet
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}: cannot listen there"):
        OpsServer("127.0.0.1", port, agg.metrics, lambda: None)


def test_reasons_become_a_short_fixed_set_of_labels() -> None:
    from aggregator.metrics import DECLINE_CATEGORIES, DROP_CATEGORIES, category

    drops = {"declined: refused: round 3 would take this device's epsilon to 9": "declined", "offline: killed": "offline",
             "rejected: SchemaError: update from device-1 is for base 0123": "rejected", "restarted during the round": "restarted",
             "straggler: the round closed after 3 updates (over-selection)": "straggler",
             "no unmask message within 5 s": "timeout", "not in the sum": "not_in_sum", "device-7 did something new": "other"}
    assert {k: category(k, DROP_CATEGORIES) for k in drops} == drops
    declines = {"secure aggregation aborted: t too low": "secagg_aborted", "refused: round 2 adds no DP noise, below ...": "privacy",
                "stale base: round 2 is for base ab": "stale_base", "refused: per-device top-k (device_topk) reveals": "refused",
                "cannot score the rollouts: bad shape": "scoring", "anything": "other"}
    assert {k: category(k, DECLINE_CATEGORIES) for k in declines} == declines


def test_json_logs_are_one_object_a_line(tmp_path: Path) -> None:
    import logging
    import subprocess
    import sys

    from shared.log_format import JsonFormatter

    rec = logging.LogRecord("aggregator.server", logging.WARNING, __file__, 1, "round %d: %s", (3, 'a "quoted"\nline'), None)
    d = json.loads(JsonFormatter().format(rec))
    assert d["level"] == "WARNING" and d["logger"] == "aggregator.server" and d["message"] == 'round 3: a "quoted"\nline'
    assert d["time"].endswith("+00:00")
    # The command line: every line it logs is one JSON object.
    out = subprocess.run([sys.executable, "-m", "aggregator.cli", "--log-format", "json", "enroll", "dev-1",
                          str(tmp_path / "missing.pub.json"), "--registry", str(tmp_path / "r.json")],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and lines, out
    rows = [json.loads(x) for x in lines]
    assert rows[-1]["level"] == "ERROR" and "missing.pub.json" in rows[-1]["message"] and rows[-1]["logger"] == "fl-agg"


def test_the_sample_scrape_config_points_at_the_default_address() -> None:
    yaml = pytest.importorskip("yaml")  # PyYAML comes with transformers
    from aggregator.config import AggregatorConfig

    conf = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "prometheus.yml").read_text())
    (job,) = conf["scrape_configs"]
    assert job["job_name"] == "fl-aggregator" and job["metrics_path"] == "/metrics"
    host = AggregatorConfig.__dataclass_fields__["metrics_host"].default
    assert job["static_configs"][0]["targets"] == [f"{host}:9464"]


def test_the_real_link_says_whether_it_is_connected(mosquitto) -> None:  # type: ignore[no-untyped-def]
    from aggregator.metrics import Metrics
    from fl_mqtt.link import MqttLink

    link = MqttLink("aggregator", mosquitto.url)
    assert not link.connected
    link.connect()
    try:
        assert link.connected and Metrics().health(link)[0] == 200
    finally:
        link.close()
    code, body = Metrics().health(link)
    assert not link.connected and code == 503 and body["broker_link"] == "down"
