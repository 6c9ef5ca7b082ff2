"""A device process with one fault built in, for the fault-injection suite (tests/test_faults.py).

Run as ``python -c "from tests.fault_inject import main; main()" FAULT run --config FILE``: it
patches one function of the real edge client and then runs the real ``fl-edge`` entry point.

Faults:
- ``nan``: every local update has a NaN in it (what a diverged or broken device produces).
- ``slow-upload``: each update upload stops after its manifest and first chunk, writes
  ``WORK_DIR/uploading`` and waits ``FAULT_PAUSE_S`` seconds (default 60) before the rest, so a
  test can kill the process, or stop the broker, in the middle of an upload.
- ``slow-train``: local training waits ``FAULT_PAUSE_S`` seconds (after writing
  ``WORK_DIR/training``) before it starts, from round ``FAULT_ROUND`` on (default 1), so a test
  can kill the process while it trains.
- ``slow-checkpoint``: right after the first training checkpoint of round ``FAULT_ROUND`` or
  later (default 1) is written, writes ``WORK_DIR/checkpointed`` (round and step) and waits
  ``FAULT_PAUSE_S`` seconds, so a test can kill the process mid-round with a checkpoint on disk.
- ``slow-unmask``: from round ``FAULT_ROUND`` on (default 1), writes ``WORK_DIR/unmasking`` and
  waits ``FAULT_PAUSE_S`` seconds before it answers the aggregator's unmask request, so a round is
  held in its unmasking step (the aggregator waits for every survivor's shares) while a test
  kills the aggregator.
- ``nan-secure``: a NaN appears in the update after the device's own check of its delta, as the
  secure input is built (``edge_client.update_builder.secure``), every round.
- ``slow-install``: installing a release stops after its first file is copied, writes
  ``WORK_DIR/installing`` and waits ``FAULT_PAUSE_S`` seconds, so a test can kill the device (or
  the aggregator) in the middle of an install.
- ``standby``: loads everything and waits for ``WORK_DIR/go`` before it connects: a restart
  whose start-up cost (imports, model load) was paid before the old process was killed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any


def _nan() -> None:
    import numpy as np

    import fl_lm.lora as lora

    real = lora.sub

    def sub(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = real(a, b)
        first = sorted(out)[0]
        v = np.array(out[first], copy=True)
        v.reshape(-1)[0] = np.nan
        out[first] = v
        return out

    lora.sub = sub


def _slow_upload(work_dir: Path) -> None:
    import os

    import fl_mqtt.transfer as transfer

    pause = float(os.environ.get("FAULT_PAUSE_S", "60"))

    real = transfer.iter_chunks

    def iter_chunks(payload: bytes, manifest: Any, todo: list[int]) -> Any:
        for i, chunk in enumerate(real(payload, manifest, todo)):
            if i == 1:
                (work_dir / "uploading").write_text(str(manifest.count))
                time.sleep(pause)
            yield chunk

    transfer.iter_chunks = iter_chunks


def _slow_train(work_dir: Path) -> None:
    import os

    import fl_lm.train as train

    pause, first = float(os.environ.get("FAULT_PAUSE_S", "60")), int(os.environ.get("FAULT_ROUND", "1"))
    real = train.train_lora
    calls = {"n": 0}

    def train_lora(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] >= first:
            (work_dir / "training").write_text(str(calls["n"]))
            time.sleep(pause)
        return real(*a, **k)

    train.train_lora = train_lora


def _slow_checkpoint(work_dir: Path) -> None:
    import os

    import edge_client.train_checkpoint as tc

    pause, first = float(os.environ.get("FAULT_PAUSE_S", "60")), int(os.environ.get("FAULT_ROUND", "1"))
    real = tc.save

    def save(work: Path, ck: Any) -> None:
        real(work, ck)
        if ck.header.round >= first and not (work_dir / "checkpointed").exists():
            (work_dir / "checkpointed.tmp").write_text(f"{ck.header.round} {ck.state.step}")
            os.replace(work_dir / "checkpointed.tmp", work_dir / "checkpointed")  # the test reads it whole
            time.sleep(pause)

    tc.save = save


def _slow_unmask(work_dir: Path) -> None:
    import os

    from shared.secagg import hardened

    pause, first = float(os.environ.get("FAULT_PAUSE_S", "60")), int(os.environ.get("FAULT_ROUND", "1"))
    real = hardened.client_unmask
    calls = {"n": 0}  # one unmask request per secure round: the n-th call is round n's

    def client_unmask(state: Any, req: Any, ident: Any) -> Any:
        calls["n"] += 1
        if calls["n"] >= first:
            (work_dir / "unmasking").write_text(str(calls["n"]))
            time.sleep(pause)
        return real(state, req, ident)

    hardened.client_unmask = client_unmask


def _nan_secure() -> None:
    import numpy as np

    import edge_client.update_builder as ub

    real = ub.secure

    def secure(delta: Any, *a: Any, **k: Any) -> Any:
        d = np.array(delta, copy=True)
        d.reshape(-1)[0] = np.nan
        return real(d, *a, **k)

    ub.secure = secure


def _slow_install(work_dir: Path) -> None:
    import os

    import edge_client.releases as releases

    pause = float(os.environ.get("FAULT_PAUSE_S", "60"))
    real = releases.shutil.copyfile
    copied = {"n": 0}

    def copyfile(src: Any, dst: Any, *a: Any, **k: Any) -> Any:
        out = real(src, dst, *a, **k)
        copied["n"] += 1
        if copied["n"] == 1:
            (work_dir / "installing").write_text(str(dst))
            time.sleep(pause)
        return out

    releases.shutil.copyfile = copyfile  # type: ignore[assignment]


def _standby(work_dir: Path) -> None:
    from edge_client.client import EdgeClient

    real = EdgeClient.connect

    def connect(self: EdgeClient) -> None:
        while not (work_dir / "go").exists():
            time.sleep(0.02)
        # A restart reads the durable state when it starts; this process started before the old
        # one stopped writing it, so it reads it again now.
        from edge_client import state as device_state
        from shared.chunking import UploadJournal

        self._state = device_state.load(self.work)
        self.outbox = UploadJournal(self.work / "outbox")
        self.residual = self._load_residual()
        real(self)

    EdgeClient.connect = connect  # type: ignore[method-assign]


def main() -> None:
    import json

    fault, argv = sys.argv[1], sys.argv[2:]
    cfg = json.loads(Path(argv[argv.index("--config") + 1]).read_text())
    if fault == "nan":
        _nan()
    elif fault == "slow-upload":
        _slow_upload(Path(cfg["work_dir"]))
    elif fault == "slow-train":
        _slow_train(Path(cfg["work_dir"]))
    elif fault == "slow-checkpoint":
        _slow_checkpoint(Path(cfg["work_dir"]))
    elif fault == "slow-unmask":
        _slow_unmask(Path(cfg["work_dir"]))
    elif fault == "nan-secure":
        _nan_secure()
    elif fault == "slow-install":
        _slow_install(Path(cfg["work_dir"]))
    elif fault == "standby":
        _standby(Path(cfg["work_dir"]))
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    from edge_client.cli import main as edge_main

    sys.exit(edge_main(argv))


def agg_main() -> None:
    """The aggregator with one fault built in: ``python -c "from tests.fault_inject import agg_main;
    agg_main()" FAULT run --config FILE``. At round ``FAULT_ROUND`` (default 2):

    - ``disk-full``: writing the round's adapters fails with ENOSPC (what a full disk gives);
    - ``read-only-store``: the store's connection is reopened read-only just before the round's
      commit, so SQLite itself refuses the write ("attempt to write a readonly database").
    """
    import errno
    import os
    import sqlite3

    fault, argv = sys.argv[1], sys.argv[2:]
    rnd = int(os.environ.get("FAULT_ROUND", "2"))
    if fault == "disk-full":
        import aggregator.checkpoint as checkpoint

        real_save = checkpoint.save_adapters

        def save_adapters(out_dir: Path, r: int, *a: Any, **k: Any) -> Any:
            if r == rnd:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(out_dir) / "checkpoints"))
            return real_save(out_dir, r, *a, **k)

        checkpoint.save_adapters = save_adapters
    elif fault == "read-only-store":
        from aggregator.store import Store

        real_commit = Store.commit_round

        def commit_round(self: Store, st: Any, *a: Any, **k: Any) -> Any:
            if st.round == rnd:
                self.db.close()
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
            return real_commit(self, st, *a, **k)

        Store.commit_round = commit_round  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown aggregator fault {fault!r}")
    from aggregator.cli import main as agg

    sys.exit(agg(argv))
