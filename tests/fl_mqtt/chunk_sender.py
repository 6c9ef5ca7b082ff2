"""Test helper process: upload a file through ``fl_mqtt.transfer.send`` with a journal.

``--delay`` slows each chunk so a test can kill this process half way through.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fl_mqtt import transfer
from fl_mqtt.link import MqttLink
from shared.chunking import ChunkPolicy, UploadJournal


class SlowLink:
    def __init__(self, link: MqttLink, delay: float) -> None:
        self.link, self.delay = link, delay

    def publish(self, topic: str, payload: bytes, **kw: Any) -> int:
        n = self.link.publish(topic, payload, **kw)
        time.sleep(self.delay)
        return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--payload", required=True, type=Path)
    ap.add_argument("--journal", required=True, type=Path)
    ap.add_argument("--delay", type=float, default=0.0)
    a = ap.parse_args()
    link = MqttLink("chunk-sender", a.url)
    link.connect()
    transfer.send(SlowLink(link, a.delay), "t/whole", "t/chunk", a.payload.read_bytes(), ChunkPolicy(), UploadJournal(a.journal))
    link.close()


if __name__ == "__main__":
    main()
