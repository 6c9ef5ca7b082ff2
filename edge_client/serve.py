"""Answer prompts from the current release; a new release is swapped in between requests, never during one.

A request holds the lock for its whole generation; ``reload`` loads the new release first (outside
the lock, so serving goes on meanwhile) and then takes the lock to swap, which therefore waits
for the request in flight to finish.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from edge_client.releases import ReleaseStore
from fl_lm.onnx_session import OnnxLM, Sampling
from shared.errors import ConfigError

log = logging.getLogger(__name__)


class Server:
    def __init__(self, store: ReleaseStore, providers: tuple[str, ...] = (), threads: int = 0) -> None:
        self.store, self.providers, self.threads = store, providers, threads
        self._lock = threading.Lock()
        self.lm: OnnxLM | None = None
        self.release_id = ""
        self.reload()

    def reload(self) -> bool:
        """Serve the store's current release if it is not the one loaded; True if it swapped."""
        cur = self.store.current()
        if cur is None:
            if self.lm is None:
                raise ConfigError(f"no release installed under {self.store.root}")
            return False
        m, d = cur
        if m.release_id == self.release_id:
            return False
        lm = OnnxLM(d, self.providers, self.threads)  # loaded and warmed up before the swap
        with self._lock:
            self.lm, self.release_id = lm, m.release_id
        log.info("serving release %s", m.release_id)
        return True

    def generate(self, prompt: str, s: Sampling = Sampling()) -> dict[str, Any]:
        with self._lock:
            assert self.lm is not None
            text = self.lm.generate(prompt, s)
            return {"release_id": self.release_id, "text": text}

    def instruct(self, instruction: str, input_text: str = "", s: Sampling = Sampling()) -> dict[str, Any]:
        """Answer an instruction in the prompt format the student was trained with (``OnnxLM.instruction_prompt``)."""
        with self._lock:
            assert self.lm is not None
            text = self.lm.generate(self.lm.instruction_prompt(instruction, input_text), s)
            return {"release_id": self.release_id, "text": text}
