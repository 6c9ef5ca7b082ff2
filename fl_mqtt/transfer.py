"""Send payloads of any size over a link: one message when small, manifest + chunks when not.

With an ``UploadJournal`` every PUBACKed chunk is recorded, so a sender that dies half way and
is restarted with the same payload sends only the chunks the broker has not acknowledged.
"""

from __future__ import annotations

import logging
from typing import Any

from shared.chunking import ChunkPolicy, UploadJournal, iter_chunks, needs_chunking, plan_upload, split

log = logging.getLogger(__name__)


def send(link: Any, topic: str, chunk_topic: str, payload: bytes, policy: ChunkPolicy, journal: UploadJournal | None = None) -> int:
    """Publish ``payload``; returns the PUBLISH bytes put on the wire."""
    if not needs_chunking(len(payload), policy):
        return int(link.publish(topic, payload))
    if journal is not None:
        manifest, seqs = plan_upload(payload, journal, policy)
    else:
        manifest = split(payload, policy)
        seqs = list(range(manifest.count))
    todo = list(seqs)
    n = int(link.publish(chunk_topic, manifest.encode()))
    for chunk in iter_chunks(payload, manifest, todo):
        n += int(link.publish(chunk_topic, chunk.encode()))
        if journal is not None:
            journal.mark_acked(manifest.xfer_id, chunk.seq)
    if journal is not None:
        journal.finish(manifest.xfer_id)
    return n
