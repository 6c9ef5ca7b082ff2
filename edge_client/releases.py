"""The device's releases: verified before install, installed into a new directory, swapped atomically.

Layout under ``root``: one directory per release id, each holding exactly the files its signed
manifest names plus the manifest (``release.json``); ``current`` and ``previous`` are symlinks,
each replaced with one ``rename`` so a reader sees the old release or the new one, never a mix.
Nothing is unpacked or executed from a release: the files are copied, and each digest is
checked again on the copy before the switch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from shared import release
from shared.crypto import PublicKeys
from shared.errors import SchemaError

log = logging.getLogger(__name__)


class ReleaseStore:
    def __init__(self, root: str | Path, aggregator: PublicKeys, fleet: str, keep: int = 3) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.aggregator, self.fleet, self.keep = aggregator, fleet, keep
        self._clean_stale()

    def _clean_stale(self) -> None:
        """What a process killed mid-install left (a half-copied ``.incoming-*``, a link's ``.tmp``):
        never current, and the release is sent whole again, so it goes (issue 23)."""
        for p in [*self.root.glob(".*"), self.root / (self.REVOKED + ".tmp")]:
            if p.name.startswith(".incoming-") or (p.name.endswith(".tmp") and (p.exists() or p.is_symlink())):
                log.info("removing %s, left by an install that did not finish", p)
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    # -- reading ---------------------------------------------------------------------------------
    def _link(self, name: str) -> Path | None:
        p = self.root / name
        return p.resolve() if p.is_symlink() and p.resolve().is_dir() else None

    def manifest(self, directory: Path) -> release.ReleaseManifest:
        return release.verify((directory / release.MANIFEST).read_bytes(), self.aggregator, self.fleet)

    def current(self) -> tuple[release.ReleaseManifest, Path] | None:
        """The current release, its signature and every digest checked again (files can rot or be edited)."""
        d = self._link("current")
        if d is None:
            return None
        m = self.manifest(d)
        release.check_files(m, d)
        return m, d

    # -- installing ------------------------------------------------------------------------------
    def install(self, staged: Path, signed_manifest: bytes) -> release.ReleaseManifest:
        """Verify ``staged`` against the signed manifest and make it current; SchemaError (and the
        old release still current) on any failure."""
        m = release.verify(signed_manifest, self.aggregator, self.fleet)
        if m.release_id in self.revoked():
            raise SchemaError(f"release {m.release_id} was revoked by a signed rollback; it is not installed again")
        release.check_files(m, staged)
        cur = self._link("current")
        if cur is not None:
            old = self.manifest(cur)
            if m.release_id == old.release_id:
                return old  # already installed: a repeated announcement
            if m.round < old.round and m.rollback_of != old.release_id:
                raise SchemaError(f"release {m.release_id} (round {m.round}) is older than the current "
                                  f"{old.release_id} (round {old.round}) and is not a signed rollback of it")
        final = self.root / m.release_id
        if not final.is_dir():
            tmp = self.root / f".incoming-{m.release_id}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for f in m.files:
                shutil.copyfile(staged / f.name, tmp / f.name)
            (tmp / release.MANIFEST).write_bytes(signed_manifest)
            release.check_files(m, tmp)  # what was copied is what was signed
            os.replace(tmp, final)
        else:
            release.check_files(m, final)
        if m.rollback_of:
            # Revoked before the switch: a replay of the release rolled back from (signed, and
            # newer) must not put it back.
            self._revoke(m.rollback_of)
        if cur is not None and cur != final:
            self._point("previous", cur)
        self._point("current", final)
        self._prune()
        log.info("release %s (round %d, %s) installed and current", m.release_id, m.round, m.mode)
        return m

    REVOKED = "revoked.json"

    def revoked(self) -> set[str]:
        p = self.root / self.REVOKED
        if not p.exists():
            return set()
        try:
            return set(json.loads(p.read_text()))
        except ValueError as e:
            raise SchemaError(f"{p} is damaged ({e}); it lists the releases rolled back from") from None

    def _revoke(self, release_id: str) -> None:
        ids = sorted(self.revoked() | {release_id})
        tmp = self.root / (self.REVOKED + ".tmp")
        tmp.write_text(json.dumps(ids))
        os.replace(tmp, self.root / self.REVOKED)

    def rollback(self) -> release.ReleaseManifest:
        """Make ``previous`` current again (a local decision, e.g. after a signed rollback announcement)."""
        prev = self._link("previous")
        if prev is None:
            raise SchemaError("no previous release to roll back to")
        m = self.manifest(prev)
        release.check_files(m, prev)
        cur = self._link("current")
        self._point("current", prev)
        if cur is not None:
            self._point("previous", cur)
        return m

    def _point(self, name: str, target: Path) -> None:
        tmp = self.root / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target.name)
        os.replace(tmp, self.root / name)

    def _prune(self) -> None:
        keep = {p for p in (self._link("current"), self._link("previous")) if p is not None}
        dirs = sorted((p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime, reverse=True)
        for p in dirs[self.keep:]:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
