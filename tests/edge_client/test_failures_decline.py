"""Issue 23 on the device: no failure is silent, and neither a clock behind nor a broker that is
not up yet ends the process."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_mqtt.link import LinkError

DEV = "device-0"


def _client(tmp_path: Path, **cfg: Any) -> Any:
    from edge_client.client import EdgeClient
    from edge_client.config import EdgeConfig

    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    return EdgeClient(EdgeConfig(device_id=DEV, broker="mqtt://127.0.0.1:1", data=str(tmp_path / "d.jsonl"), student="unused",
                                 work_dir=str(tmp_path / "w"), insecure=True, **cfg))


def test_a_non_finite_residual_is_dropped_at_start_and_never_raised_again(tmp_path: Path, caplog) -> None:
    w = tmp_path / "w"
    w.mkdir()
    r = np.zeros(8, np.float32)
    r[3] = np.nan
    np.save(w / "residual.npy", r, allow_pickle=False)
    with caplog.at_level(logging.WARNING):
        c = _client(tmp_path)
    assert c.residual is None and not (w / "residual.npy").exists()
    assert "1 non-finite values: dropped" in caplog.text
    assert _client(tmp_path).residual is None  # and the next start finds nothing to complain of


def test_a_non_finite_secure_input_is_refused_by_the_builder() -> None:
    """A NaN that appears after the device's own check of its delta (here in an fl-minillm
    scoring vector; a residual's is refused by the projection): the builder refuses to mask it,
    so the device declines instead of sending garbage."""
    from edge_client import update_builder
    from shared import messages as M

    sp = M.SparseSpec(method="dense", dim=6, k=6, seed=0, indices=b"", value_dtype="float32")
    sa = M.SecAggSpec(node_ids=(0, 1, 2), threshold=2, graph_seed=bytes(32), clip=0.05, ring_bits=32, value_bits=20,
                      weight_norm=1, sketch_block=0)
    scores = np.full(10, 0.1)
    scores[4] = np.nan
    with pytest.raises(update_builder.NonFiniteInput, match="non-finite secure input: 1 of"):
        update_builder.secure(np.full(6, 0.01, np.float32), None, sp, sa, 5, scores=scores)
    assert update_builder.secure(np.full(6, 0.01, np.float32), None, sp, sa, 5).x is not None


def test_the_first_connect_is_retried_with_backoff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """A TLS check failing on a clock that is being set ("certificate is not yet valid"), or a
    broker not up yet: the device says so in one line a try and keeps trying."""
    import edge_client.client as client

    c = _client(tmp_path, connect_retry_s=60.0)
    fails = [LinkError("cannot connect: certificate verify failed: certificate is not yet valid")] * 2
    waits: list[float] = []

    class Link:
        def connect(self, timeout: float) -> None:
            if fails:
                raise fails.pop()

    c.link = Link()
    monkeypatch.setattr(client.time, "sleep", waits.append)
    with caplog.at_level(logging.WARNING):
        c._connect_with_retries()
    assert waits == [1.0, 2.0] and caplog.text.count("retrying in") == 2 and "not yet valid" in caplog.text
    c = _client(tmp_path, connect_retry_s=0.0)
    fails[:] = [LinkError("refused")]
    c.link = Link()
    with pytest.raises(LinkError):
        c._connect_with_retries()  # connect_retry_s = 0: the old behaviour, at once


def test_the_broker_certificate_is_valid_from_a_day_back() -> None:
    """A device 10 minutes behind failed TLS: the generated certificate was backdated 5 minutes."""
    from cryptography import x509

    from shared import crypto

    m = crypto.make_server_tls("127.0.0.1")
    cert = x509.load_pem_x509_certificate(m.server_cert_pem)
    behind = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=12)
    assert cert.not_valid_before_utc <= behind
