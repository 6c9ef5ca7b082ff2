"""Turn the global student into a signed ONNX release, or refuse to when it fails the parity gate.

Build into a hidden directory, check parity against the PyTorch student on held-out prompts,
then write the signed manifest and rename the directory into place: a release that fails is
never written under its id, so it can never be announced, and the fleet keeps the previous one.
The last ``keep`` releases stay on disk for a signed rollback: ``make_rollback`` signs a kept
release's manifest again with ``rollback_of`` naming the release it replaces; devices install it
over a newer one only when that names their current release, and revoke the replaced one.
``fl-agg rollback`` asks the running service for one (``request_rollback``); it is announced at
the next round boundary, or when the service next starts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import release
from shared.crypto import DeviceKeys
from shared.errors import ConfigError
from shared.datasets import Example

log = logging.getLogger(__name__)

PARITY_PROMPTS = 8


@dataclass(frozen=True)
class Built:
    manifest: release.ReleaseManifest
    directory: Path
    signed: bytes


def make_release(peft_model: Any, tok: Any, *, base: str, root: Path, rnd: int, mode: str, fleet: str, key: DeviceKeys,
                 heldout: list[Example], int8: bool = False, keep: int = 3) -> Built | None:
    from fl_lm.data import prompt_text
    from fl_lm.onnx_export import build_release_dir

    rid = f"r{rnd:04d}-{mode}" + ("-int8" if int8 else "")
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".build-{rid}"
    shutil.rmtree(work, ignore_errors=True)
    exs = [e for e in heldout if e.prompt][:PARITY_PROMPTS] or heldout[:PARITY_PROMPTS]
    prompts, refs = [prompt_text(tok, e) for e in exs], [e.output for e in exs]
    try:
        if int8:
            parity = _int8_release(peft_model, tok, base, work, prompts, refs, rid)
        else:
            from fl_lm.onnx_parity import check
            from fl_lm.onnx_session import OnnxLM

            build_release_dir(base, work, peft_model=peft_model)
            parity = check(peft_model, tok, OnnxLM(work), prompts, refs)
        if not parity.passed:
            log.error("release %s NOT published: parity gate failed (%s); the fleet keeps the previous release",
                      rid, parity.reason)
            return None
        m = release.ReleaseManifest(release_id=rid, fleet=fleet, round=rnd, mode=mode, base_model=base,
                                    tokenizer_sha256=release.tokenizer_digest(work),
                                    quantization="int8" if int8 else "none", files=release.describe(work),
                                    parity=parity.to_json())
        signed = release.sign(m, key)
        (work / release.MANIFEST).write_bytes(signed)
        final = root / rid
        shutil.rmtree(final, ignore_errors=True)
        os.replace(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _prune(root, keep)
    size = sum(f.size for f in m.files)
    log.info("release %s: %d files, %.2f MB, max logit diff %.2g, greedy identical %d/%d%s", rid, len(m.files), size / 1e6,
             parity.max_logit_diff, parity.greedy_identical, parity.prompts,
             f", int8 ({parity.recipe}) next-token agreement {parity.token_agreement:.3f}, held-out loss "
             f"{parity.loss_onnx:.4f} vs {parity.loss_torch:.4f}" if int8 else "")
    (root / "latest.json").write_text(json.dumps({"release_id": rid, "round": rnd, "bytes": size, "parity": parity.to_json()},
                                                 indent=2))
    return Built(m, final, signed)


def _int8_release(peft_model: Any, tok: Any, base: str, work: Path, prompts: list[str], refs: list[str], rid: str) -> Any:
    """Export once, then quantize by each int8 recipe in turn (smallest first) into ``work`` until
    one passes the parity gate; the last one's figures when none does."""
    import dataclasses
    import tempfile

    from fl_lm.onnx_export import INT8_RECIPES, build_release_dir, quantize_int8
    from fl_lm.onnx_parity import check
    from fl_lm.onnx_session import OnnxLM

    with tempfile.TemporaryDirectory(prefix="fl-release-") as tmp:
        fp32 = build_release_dir(base, Path(tmp) / "fp32", peft_model=peft_model)
        for recipe in INT8_RECIPES:
            shutil.rmtree(work, ignore_errors=True)
            quantize_int8(fp32, work, recipe)
            parity = dataclasses.replace(check(peft_model, tok, OnnxLM(work), prompts, refs, quantization="int8"),
                                         recipe=recipe)
            if parity.passed:
                return parity
            log.warning("release %s: int8 recipe %r fails the parity gate (%s)%s", rid, recipe, parity.reason,
                        "" if recipe == INT8_RECIPES[-1] else "; trying the next")
    return parity


def clean_stale(root: Path) -> list[str]:
    """Remove the ``.build-*`` directories a stopped aggregator left (never published: a release
    is renamed into place only once it is signed); returns their names."""
    gone = []
    for p in sorted(root.glob(".build-*")) if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p.name)
    return gone


def find_built(root: Path, rnd: int, key_public: Any, fleet: str) -> Built | None:
    """A release of round ``rnd`` on disk whose signed manifest and files verify: one that was
    built and signed before the aggregator stopped, and is not built again."""
    for rid, m in sorted(kept(root, key_public, fleet).items()):
        if m.round == rnd and not m.rollback_of:
            d = root / rid
            try:
                release.check_files(m, d)
            except Exception as e:  # noqa: BLE001 - a damaged one is rebuilt
                log.warning("release %s on disk does not verify (%s); building it again", rid, e)
                continue
            return Built(m, d, (d / release.MANIFEST).read_bytes())
    return None


def load_built(root: Path, signed: bytes, key_public: Any, fleet: str) -> Built:
    """The release a stored signed manifest names, its files checked again: what a resend sends.
    ``ProtocolError``/``ConfigError`` when it is gone or damaged."""
    m = release.verify(signed, key_public, fleet)
    d = root / m.release_id
    if not d.is_dir():
        raise ConfigError(f"release {m.release_id} is not under {root} any more")
    release.check_files(m, d)
    return Built(m, d, signed)


def write_latest(root: Path, b: Built) -> None:
    (root / "latest.json").write_text(json.dumps({"release_id": b.manifest.release_id, "round": b.manifest.round,
                                                  "bytes": sum(f.size for f in b.manifest.files),
                                                  "parity": b.manifest.parity}, indent=2))


def _prune(root: Path, keep: int) -> None:
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for p in dirs[keep:]:
        shutil.rmtree(p, ignore_errors=True)


ROLLBACK_REQUEST = "rollback-request.json"
ROLLBACKS = "rollbacks.jsonl"


def kept(root: Path, key_public: Any, fleet: str) -> dict[str, release.ReleaseManifest]:
    """The releases on disk whose signed manifests verify, by id."""
    out: dict[str, release.ReleaseManifest] = {}
    if not root.is_dir():
        return out
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith(".") and (d / release.MANIFEST).exists():
            try:
                out[d.name] = release.verify((d / release.MANIFEST).read_bytes(), key_public, fleet)
            except Exception as e:  # a damaged kept release is not a rollback target
                log.warning("kept release %s is unusable: %s", d.name, e)
    return out


def current_id(root: Path) -> str | None:
    p = root / "latest.json"
    return str(json.loads(p.read_text())["release_id"]) if p.exists() else None


def request_rollback(root: Path, to: str, reason: str, key_public: Any, fleet: str) -> str:
    """Check the target and leave the request for the service; returns the release it replaces."""

    have = kept(root, key_public, fleet)
    cur = current_id(root)
    if to not in have:
        raise ConfigError(f"no kept release {to!r} under {root} (kept: {', '.join(sorted(have)) or 'none'})")
    if cur is None or cur == to:
        raise ConfigError(f"release {to!r} is already the current one" if cur == to else f"no release is current under {root}")
    tmp = root / (ROLLBACK_REQUEST + ".tmp")
    tmp.write_text(json.dumps({"to": to, "replaces": cur, "reason": reason}))
    os.replace(tmp, root / ROLLBACK_REQUEST)
    return cur


def make_rollback(root: Path, to: str, replaces: str, key: DeviceKeys, fleet: str) -> Built:
    """The kept release ``to``, its manifest signed again as a rollback of ``replaces``."""
    from dataclasses import replace as dc_replace


    d = root / to
    if not (d / release.MANIFEST).exists():
        raise ConfigError(f"no kept release {to!r} under {root}")
    m = release.verify((d / release.MANIFEST).read_bytes(), key.public, fleet)
    release.check_files(m, d)  # what we send is still what was signed
    rb = dc_replace(m, rollback_of=replaces)
    return Built(rb, d, release.sign(rb, key))


def record_rollback(root: Path, entry: dict[str, Any]) -> None:
    with (root / ROLLBACKS).open("a") as f:
        f.write(json.dumps(entry) + "\n")
    latest = json.loads((root / "latest.json").read_text()) if (root / "latest.json").exists() else {}
    latest.update({"release_id": entry["to"], "rollback_of": entry["replaces"]})
    (root / "latest.json").write_text(json.dumps(latest, indent=2))
