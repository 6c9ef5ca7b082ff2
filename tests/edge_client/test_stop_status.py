"""A device that stops after connecting, for whatever reason, says why in one line in its signed
"offline" status (issue 21), so the aggregator's round record names the cause instead of waiting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fl_mqtt.link import Incoming
from shared import messages as M
from shared import secure, topics

DEV = "device-0"


class Link:
    """Hands the device what ``script`` gives, one call of ``get`` at a time; records what it publishes."""

    def __init__(self, script: list[Any]) -> None:
        self.script, self.sent = list(script), []

    def subscribe(self, filt: str, qos: int = 1) -> None:
        pass

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 60.0) -> int:
        self.sent.append((topic, payload))
        return len(payload)

    def get(self, timeout: float | None = None) -> Incoming | None:
        nxt = self.script.pop(0) if self.script else None
        if isinstance(nxt, BaseException):
            raise nxt
        return nxt

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from fl_sim.run import make_keys

    return make_keys(tmp_path_factory.mktemp("keys"), [DEV])


def _device(tmp_path: Path, keys: dict[str, str], script: list[Any], **cfg: Any) -> Any:
    from edge_client.client import EdgeClient
    from edge_client.config import EdgeConfig

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    c = EdgeClient(EdgeConfig(device_id=DEV, broker="mqtt://127.0.0.1:1", data=str(tmp_path / "d.jsonl"), student="unused",
                              work_dir=str(tmp_path / "w"), keys=keys[DEV], aggregator_keys=keys["aggregator_pub"], **cfg))
    c.load_model = lambda: None  # what is checked before connecting is tested elsewhere (test_planner, test_device)

    def connect() -> None:
        c.link = Link(script)
        c.on_connected()

    c.connect = connect
    return c


def _last_status(c: Any, keys: dict[str, str]) -> tuple[str, str]:
    from shared.crypto import load_public_keys

    pub = load_public_keys(keys[DEV].replace(".key", ".pub.json"))
    topic, payload = c.link.sent[-1]
    assert topic == topics.up(DEV, "status")
    st = secure.open_message(payload, M.DeviceStatus, device_id=DEV, check_round=lambda r: None, recipient=None, sender=pub,
                             sealed=False)  # signed by the device: verifies under its key
    return st.state, st.detail


@pytest.mark.parametrize(("stop", "want"), [
    (RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be reported later"),
     "stopped: RuntimeError: CUDA error: an illegal memory access was encountered"),
    (KeyboardInterrupt(), "stopped: interrupted"),
    (MemoryError(), "stopped: MemoryError"),
])
def test_a_device_that_fails_says_why_in_its_signed_offline_status(tmp_path: Path, keys: dict[str, str], stop: BaseException,
                                                                  want: str) -> None:
    c = _device(tmp_path, keys, [None, stop])
    with pytest.raises(type(stop)):
        c.run()
    assert _last_status(c, keys) == ("offline", want)


def test_a_device_told_to_stop_or_left_idle_says_so(tmp_path: Path, keys: dict[str, str]) -> None:
    from shared.crypto import load_private_keys

    bye = secure.sign_message(M.Shutdown(reason="done"), round=0, device_id=secure.BROADCAST,
                              key=load_private_keys(keys["aggregator"]))
    c = _device(tmp_path / "a", keys, [Incoming(topics.bcast("shutdown"), bye, len(bye))])
    c.run()
    assert _last_status(c, keys) == ("offline", "aggregator shut down (done)")
    c = _device(tmp_path / "b", keys, [], idle_timeout_s=0.05)
    c.run()
    assert _last_status(c, keys) == ("offline", "no message for 0.05s (idle_timeout_s)")
