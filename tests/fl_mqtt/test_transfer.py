"""Chunked transfer over a real Mosquitto: 50 MB in 256 KiB chunks, sender killed and resumed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from shared.chunking import Chunk, ChunkPolicy, Manifest, Reassembler, UploadJournal, decode_frame
from tests.brokers import Mosquitto

ROOT = Path(__file__).resolve().parents[2]


class Receiver:
    def __init__(self, url: str) -> None:
        self.r = Reassembler(max_transfer_bytes=64 << 20, max_total_bytes=128 << 20)
        self.seen: Counter[int] = Counter()
        self.done: bytes | None = None
        self.manifests = 0
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="chunk-receiver", protocol=mqtt.MQTTv5)
        self.c.on_message = self.on_message
        host, port = url.removeprefix("mqtt://").split(":")
        self.c.connect(host, int(port))
        self.c.subscribe("t/chunk", qos=1)
        self.c.loop_start()
        time.sleep(0.3)

    def on_message(self, client: object, userdata: object, msg: mqtt.MQTTMessage) -> None:
        frame = decode_frame(msg.payload)
        with self.lock:
            if isinstance(frame, Manifest):
                self.manifests += 1
                self.r.start(frame, sender="s")
            elif isinstance(frame, Chunk):
                self.seen[frame.seq] += 1
                out = self.r.add(frame, sender="s")
                if out is not None:
                    self.done = out

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _sender(url: str, payload: Path, journal: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.fl_mqtt.chunk_sender", "--url", url, "--payload", str(payload),
                             "--journal", str(journal), "--delay", str(delay)], cwd=ROOT)


@pytest.mark.timeout(180)
def test_chunk_50mb_upload_resumes_after_sender_is_killed(tmp_path: Path, mosquitto: Mosquitto) -> None:
    data = os.urandom(50 * 1000 * 1000)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(data)
    count = -(-len(data) // ChunkPolicy().chunk_size)
    assert ChunkPolicy().chunk_size <= 256 * 1024 and count >= 190
    rx = Receiver(mosquitto.url)
    try:
        p = _sender(mosquitto.url, payload, tmp_path / "journal", delay=0.02)
        deadline = time.monotonic() + 90
        while len(rx.seen) < count // 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        p.kill()  # SIGKILL half way: no cleanup, no goodbye
        p.wait()
        with rx.lock:
            got_before = set(rx.seen)
        acked_before = UploadJournal(tmp_path / "journal").unfinished()
        assert len(acked_before) == 1, "the journal must hold the unfinished transfer"
        acked = UploadJournal(tmp_path / "journal").acked(acked_before[0].xfer_id)
        assert count // 3 < len(acked) < count, f"killed at {len(acked)} of {count} chunks"
        assert rx.done is None

        p2 = _sender(mosquitto.url, payload, tmp_path / "journal", delay=0.0)
        assert p2.wait(120) == 0
        deadline = time.monotonic() + 30
        while rx.done is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        rx.close()
    assert rx.done is not None and hashlib.sha256(rx.done).digest() == hashlib.sha256(data).digest()
    assert set(rx.seen) == set(range(count))
    # No chunk the broker had acknowledged before the kill was sent again.
    resent = {s for s, n in rx.seen.items() if n > 1}
    assert not (resent & set(acked)), f"acknowledged chunks resent: {sorted(resent & set(acked))[:5]}"
    assert len(resent) <= 1  # at most the one chunk in flight when the sender died
    assert got_before <= set(acked) | resent
    assert not UploadJournal(tmp_path / "journal").unfinished()  # finished transfers are forgotten
