"""The ONNX release (issue 12): export and parity, int8, optimum loads it, signed manifest, device install.

The student is the tiny offline model, briefly pretrained, with a LoRA adapter whose B matrices are random, so merging
matters: the release must answer as base+adapter does, not as the base.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from shared import release
from shared.crypto import generate_keys
from shared.datasets import Example
from shared.errors import SchemaError

FLEET = "fleet-test"
HELD = [Example("Add one.", str(i), str(i + 1), "arith") for i in range(5)] + \
       [Example("Name a colour.", "", "red", "colour"), Example("Say hi.", "", "hi", "chat"), Example("", "", "plain text", "t")]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    import torch

    from aggregator.release import make_release
    from fl_lm.loading import load_model, load_tokenizer
    from fl_lm.lora import attach_lora
    from fl_sim.models_cli import build_default
    from shared.messages import LoraSpec

    # A briefly pretrained student (a random one answers every prompt with the same token, and
    # identical greedy outputs would prove nothing).
    base = build_default(tmp_path_factory.mktemp("models"), seed=0, pretrain_steps=150, teacher_pretrain_steps=0)["student"]
    tok = load_tokenizer(base)
    peft = attach_lora(load_model(base), LoraSpec(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj", "embed_tokens")))  # tied embeddings adapted: see fl_lm.onnx_export._merge
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft.eval()
    root = tmp_path_factory.mktemp("agg") / "releases"
    key = generate_keys()
    fp32 = make_release(peft, tok, base=base, root=root, rnd=3, mode="fedkd", fleet=FLEET, key=key, heldout=HELD)
    int8 = make_release(peft, tok, base=base, root=root, rnd=4, mode="fedkd", fleet=FLEET, key=key, heldout=HELD, int8=True)
    assert fp32 is not None and int8 is not None
    return {"peft": peft, "tok": tok, "base": base, "root": root, "key": key, "fp32": fp32, "int8": int8}


def test_exported_student_answers_as_pytorch(built) -> None:
    import torch

    from fl_lm.loading import load_model
    from fl_lm.onnx_session import OnnxLM

    p = built["fp32"].manifest.parity
    assert p["passed"] and p["greedy_identical"] == p["prompts"] == sum(1 for e in HELD if e.prompt) and p["max_logit_diff"] < 1e-3
    lm = OnnxLM(built["fp32"].directory)
    tok = built["tok"]
    ids = tok("### Instruction:\nAdd one.\n### Input:\n7\n### Response:\n", add_special_tokens=False)["input_ids"]
    onnx_logits, _ = lm.forward(np.array([ids]))
    with torch.no_grad():
        adapted = built["peft"](torch.tensor([ids])).logits[0].numpy()
        plain = load_model(built["base"])(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(onnx_logits[0] - adapted).max() < 1e-3
    assert np.abs(onnx_logits[0] - plain).max() > 0.1  # the adapter was merged in, not dropped
    # The continuations are not trivial: they differ between prompts, so "identical" could fail.
    outs = {lm.generate(e.prompt) for e in HELD if e.prompt}
    assert len(outs) > 1, outs


def test_int8_is_at_least_3x_smaller_and_agrees(built) -> None:
    size = {k: (built[k].directory / "model.onnx").stat().st_size for k in ("fp32", "int8")}
    assert size["fp32"] / size["int8"] >= 3.0, size
    p = built["int8"].manifest.parity
    assert p["passed"] and p["token_agreement"] >= 0.9 and p["quantization"] == "int8"
    assert built["int8"].manifest.quantization == "int8"


def test_int8_takes_the_next_recipe_when_one_fails_the_gate(built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """On the real 63.7M student the full int8 recipe agreed on 74% of next tokens; the release then
    tries the outlier-safe one (MLP down-projections in float32) on the same export, and records which shipped."""
    import dataclasses

    from aggregator.release import make_release
    from fl_lm import onnx_parity

    assert built["int8"].manifest.parity["recipe"] == "full"  # the toy student passes with the smallest
    real, seen = onnx_parity.check, []

    def full_fails(*a: object, **k: object) -> onnx_parity.Parity:
        p = real(*a, **k)  # type: ignore[arg-type]
        seen.append(p)
        return dataclasses.replace(p, passed=False, reason="refused by the test") if len(seen) == 1 else p

    monkeypatch.setattr(onnx_parity, "check", full_fails)
    got = make_release(built["peft"], built["tok"], base=built["base"], root=tmp_path / "releases", rnd=5, mode="fedkd",
                       fleet=FLEET, key=built["key"], heldout=HELD, int8=True)
    assert got is not None and len(seen) == 2
    assert got.manifest.parity["recipe"] == "outlier-safe" and got.manifest.parity["passed"]
    assert any("int8 recipe 'full' fails the parity gate (refused by the test); trying the next" in r.getMessage()
               for r in caplog.records)
    size = (got.directory / "model.onnx").stat().st_size
    assert (built["int8"].directory / "model.onnx").stat().st_size < size < (built["fp32"].directory / "model.onnx").stat().st_size


def test_optimum_loads_the_release_and_generates_the_same_text(built) -> None:
    from optimum.onnxruntime import ORTModelForCausalLM

    from fl_lm.onnx_session import OnnxLM, Sampling

    d = built["fp32"].directory
    om = ORTModelForCausalLM.from_pretrained(str(d))
    lm = OnnxLM(d)
    tok = built["tok"]
    for e in HELD[:4]:
        enc = tok(e.prompt, return_tensors="pt", add_special_tokens=False)
        g = om.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        theirs = tok.decode(g[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert lm.generate(e.prompt, Sampling(max_new_tokens=16)) == theirs


def _store(built, tmp_path: Path):
    from edge_client.releases import ReleaseStore

    s = ReleaseStore(tmp_path / "device", built["key"].public, FLEET)
    s.install(built["fp32"].directory, built["fp32"].signed)
    return s


def test_tampered_wrongly_signed_or_foreign_releases_are_refused(built, tmp_path: Path) -> None:
    import shutil

    store = _store(built, tmp_path)
    new = built["int8"]
    for f in new.manifest.files:  # one byte changed in any file
        staged = tmp_path / f"staged-{f.name}"
        shutil.copytree(new.directory, staged)
        data = bytearray((staged / f.name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (staged / f.name).write_bytes(bytes(data))
        with pytest.raises(SchemaError, match=f.name):
            store.install(staged, new.signed)
        assert store.current()[0].release_id == built["fp32"].manifest.release_id  # the old one still serves
    other = generate_keys()
    with pytest.raises(SchemaError, match="signature"):
        store.install(new.directory, release.sign(new.manifest, other))
    flipped = bytearray(new.signed)
    flipped[-1] ^= 0x01
    with pytest.raises(SchemaError, match="signature"):
        store.install(new.directory, bytes(flipped))
    from dataclasses import replace

    foreign = release.sign(replace(new.manifest, fleet="another-fleet"), built["key"])
    with pytest.raises(SchemaError, match="another-fleet"):
        store.install(new.directory, foreign)
    older = release.sign(replace(new.manifest, release_id="r0001-old", round=1), built["key"])
    with pytest.raises(SchemaError, match="older than the current"):
        store.install(new.directory, older)
    assert store.current()[0].release_id == built["fp32"].manifest.release_id
    m = store.install(new.directory, new.signed)  # the genuine one installs
    assert store.current()[0].release_id == m.release_id == new.manifest.release_id
    assert store.rollback().release_id == built["fp32"].manifest.release_id


def test_a_release_arriving_during_a_request_is_swapped_in_after_it(built, tmp_path: Path) -> None:
    from edge_client.serve import Server
    from fl_lm.onnx_session import Sampling

    store = _store(built, tmp_path)
    server = Server(store)
    assert server.release_id == built["fp32"].manifest.release_id
    started, proceed = threading.Event(), threading.Event()
    real = server.lm.generate_ids

    def slow(ids, s=Sampling()):
        started.set()
        proceed.wait(10)
        return real(ids, s)

    server.lm.generate_ids = slow  # type: ignore[method-assign]
    answer: dict = {}
    req = threading.Thread(target=lambda: answer.update(server.generate("### Instruction:\nSay hi.\n### Response:\n")))
    req.start()
    assert started.wait(10)
    store.install(built["int8"].directory, built["int8"].signed)  # arrives mid-request
    swap = threading.Thread(target=server.reload)
    swap.start()
    time.sleep(0.5)
    assert swap.is_alive() and server.release_id == built["fp32"].manifest.release_id  # waits for the request
    proceed.set()
    req.join(10)
    swap.join(30)
    assert answer["release_id"] == built["fp32"].manifest.release_id
    assert server.release_id == built["int8"].manifest.release_id
    assert server.generate("Hello")["release_id"] == built["int8"].manifest.release_id


def test_a_release_failing_the_parity_gate_is_never_written(built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A broken export (here: int8 weights shipped as if fp32) fails the fp32 gate and is not published."""
    import fl_lm.onnx_export as ex
    from aggregator.release import make_release

    real = ex.build_release_dir
    monkeypatch.setattr(ex, "build_release_dir", lambda base, out, **kw: real(base, out, **{**kw, "int8": True}))
    root = tmp_path / "releases"
    got = make_release(built["peft"], built["tok"], base=built["base"], root=root, rnd=9, mode="fedkd", fleet=FLEET,
                       key=built["key"], heldout=HELD)
    assert got is None
    assert not [p for p in root.iterdir()]  # nothing under any id, no latest.json
    assert any("NOT published: parity gate failed" in r.getMessage() for r in caplog.records)


def test_fl_edge_generate_answers_from_the_verified_release(built, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    import json

    from edge_client import cli
    from fl_lm.onnx_session import OnnxLM, Sampling
    from shared.crypto import save_private_keys, save_public_keys

    save_private_keys(generate_keys(), tmp_path / "dev.key")
    save_public_keys(built["key"].public, tmp_path / "agg.pub.json")
    cfg = tmp_path / "device.json"
    cfg.write_text(json.dumps({"device_id": "dev-1", "broker": "mqtt://127.0.0.1:1", "data": "unused.jsonl",
                               "student": built["base"], "keys": str(tmp_path / "dev.key"),
                               "aggregator_keys": str(tmp_path / "agg.pub.json"), "fleet": FLEET,
                               "work_dir": str(tmp_path / "w"), "releases_dir": str(tmp_path / "device")}))
    prompt = "### Instruction:\nAdd one.\n### Input:\n3\n### Response:\n"
    assert cli.main(["generate", prompt, "--config", str(cfg)]) == 2  # nothing installed yet: one line
    assert any("no release installed" in r.getMessage() for r in caplog.records)
    _store(built, tmp_path)
    capsys.readouterr()
    assert cli.main(["generate", prompt, "--config", str(cfg), "--max-new-tokens", "12"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == {"release_id": built["fp32"].manifest.release_id,
                   "text": OnnxLM(built["fp32"].directory).generate(prompt, Sampling(max_new_tokens=12))}
    # An instruction is formatted as training formatted it: this tokenizer has no chat template,
    # so the Alpaca template, which is the prompt above.
    assert cli.main(["generate", "--instruction", "Add one.", "--input", "3", "--config", str(cfg),
                     "--max-new-tokens", "12"]) == 0
    assert json.loads(capsys.readouterr().out) == got
    # Edited on disk after install: refused at load, not served.
    onnx = tmp_path / "device" / built["fp32"].manifest.release_id / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[100] ^= 0xFF
    onnx.write_bytes(bytes(data))
    assert cli.main(["generate", prompt, "--config", str(cfg)]) == 2


def test_a_signed_rollback_reinstates_a_kept_release_and_revokes_the_bad_one(built, tmp_path: Path) -> None:
    """The aggregator keeps its last releases and announces a signed rollback; the device goes
    back to the kept one only because the rollback names its current release, and the release
    rolled back from is revoked: replaying it (it is signed, and newer) does not put it back."""
    import json
    import shutil
    from dataclasses import replace
    from types import SimpleNamespace

    from aggregator import release as rel
    from aggregator.server import Aggregator
    from edge_client.releases import ReleaseStore
    from shared.errors import ConfigError

    good, bad = built["fp32"], built["int8"]
    root = tmp_path / "out" / "releases"
    shutil.copytree(built["root"], root)
    (root / "latest.json").write_text(json.dumps({"release_id": bad.manifest.release_id}))
    key = built["key"]
    device = ReleaseStore(tmp_path / "device", key.public, FLEET)
    device.install(good.directory, good.signed)
    device.install(bad.directory, bad.signed)
    assert device.current()[0].release_id == bad.manifest.release_id

    with pytest.raises(ConfigError, match="no kept release 'r0099-x'.*r0003-fedkd"):
        rel.request_rollback(root, "r0099-x", "", key.public, FLEET)
    with pytest.raises(ConfigError, match="already the current"):
        rel.request_rollback(root, bad.manifest.release_id, "", key.public, FLEET)
    assert rel.request_rollback(root, good.manifest.release_id, "wrong answers", key.public, FLEET) == bad.manifest.release_id

    def send_release(devices, msg, rnd, rid, timeout):  # type: ignore[no-untyped-def]
        staged = tmp_path / "staged"  # what the device receives: the message's files and signed manifest
        staged.mkdir()
        for f in msg.files:
            (staged / f.name).write_bytes(f.data)
        m = device.install(staged, msg.manifest)
        return {"down_bytes": {}, "installed": [devices[0]] if m.release_id == rid else [], "refused": {}, "no_answer": []}

    from aggregator.metrics import Metrics
    from aggregator.store import Store

    svc = SimpleNamespace(out=root.parent, release_key=key, cfg=SimpleNamespace(release=SimpleNamespace(fleet=FLEET), round_timeout_s=5),
                          col=SimpleNamespace(send_release=send_release), online={"device-0": 1}, round=6, shutdown_round=6,
                          _released_loss=1.0, store=Store(tmp_path / "aggregator.db"), audit=None, metrics=Metrics())
    svc._audit_release = lambda *a: Aggregator._audit_release(svc, *a)  # type: ignore[arg-type]
    svc.deliver = lambda b, devices, rnd: Aggregator.deliver(svc, b, devices, rnd)  # type: ignore[arg-type]
    entry = Aggregator.rollback_if_requested(svc)  # type: ignore[arg-type]
    assert entry is not None and entry["installed"] == ["device-0"] and entry["reason"] == "wrong answers"
    # The store keeps the rollback as the latest release (what a device that lacks it is sent) and who installed it.
    latest = svc.store.latest_release()
    assert latest.release_id == good.manifest.release_id and latest.detail == f"rollback of {bad.manifest.release_id}"
    assert release.verify(latest.manifest, key.public, FLEET).rollback_of == bad.manifest.release_id
    assert svc.store.deliveries(good.manifest.release_id) == {"device-0": "installed"}
    assert Aggregator.rollback_if_requested(svc) is None  # a request is announced once  # type: ignore[arg-type]
    assert device.current()[0].release_id == good.manifest.release_id
    assert json.loads((root / "latest.json").read_text())["release_id"] == good.manifest.release_id
    assert [json.loads(x)["to"] for x in (root / rel.ROLLBACKS).read_text().splitlines()] == [good.manifest.release_id]

    with pytest.raises(SchemaError, match="revoked by a signed rollback"):
        device.install(bad.directory, bad.signed)  # the replay of the bad release
    assert device.current()[0].release_id == good.manifest.release_id

    # A rollback is accepted only over the release it names.
    other = ReleaseStore(tmp_path / "other", key.public, FLEET)
    other.install(bad.directory, bad.signed)
    wrong = release.sign(replace(good.manifest, rollback_of="r0005-fedkd"), key)
    with pytest.raises(SchemaError, match="older than the current"):
        other.install(good.directory, wrong)


def test_fl_agg_rollback_checks_the_target_and_leaves_a_request(built, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging
    import shutil

    from aggregator import cli
    from aggregator.release import ROLLBACK_REQUEST
    from shared.crypto import save_private_keys

    out = tmp_path / "out"
    shutil.copytree(built["root"], out / "releases")
    (out / "releases" / "latest.json").write_text(json.dumps({"release_id": built["int8"].manifest.release_id}))
    save_private_keys(built["key"], tmp_path / "agg.key")
    cfg = tmp_path / "agg.json"
    cfg.write_text(json.dumps({"broker": "mqtts://127.0.0.1:1", "student": built["base"], "eval_data": str(tmp_path),
                               "out_dir": str(out), "keys": str(tmp_path / "agg.key"), "registry": str(tmp_path / "registry.json"), "secagg": False, "mode": "fedit",
                               "release": {"fleet": FLEET}}))
    with caplog.at_level(logging.INFO):
        assert cli.main(["rollback", "--config", str(cfg), "--to", "r0042-nope"]) == 2
    err = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(err) == 1 and "no kept release 'r0042-nope'" in err[0] and not (out / "releases" / ROLLBACK_REQUEST).exists()
    to = built["fp32"].manifest.release_id
    assert cli.main(["rollback", "--config", str(cfg), "--to", to, "--reason", "regressed"]) == 0
    req = json.loads((out / "releases" / ROLLBACK_REQUEST).read_text())
    assert req == {"to": to, "replaces": built["int8"].manifest.release_id, "reason": "regressed"}


def _service(built, tmp_path: Path, *, rnd: int, sent: list, online: dict[str, str], installs: bool = True):  # type: ignore[no-untyped-def]
    """The aggregator's release methods on a fake service: real store, real releases on disk, a
    collector that installs what it is sent into per-device ReleaseStores."""
    import shutil
    from types import SimpleNamespace

    from aggregator.metrics import Metrics
    from aggregator.server import Aggregator
    from aggregator.store import Store
    from edge_client.releases import ReleaseStore

    root = tmp_path / "out" / "releases"
    shutil.copytree(built["root"], root)
    key = built["key"]
    devices = {d: ReleaseStore(tmp_path / "dev" / d, key.public, FLEET) for d in online}

    def send_release(devs, msg, r, rid, timeout):  # type: ignore[no-untyped-def]
        sent.append((tuple(devs), rid, r))
        ok = []
        for d in devs:
            if installs:
                staged = tmp_path / "staged" / d
                shutil.rmtree(staged, ignore_errors=True)
                staged.mkdir(parents=True)
                for f in msg.files:
                    (staged / f.name).write_bytes(f.data)
                devices[d].install(staged, msg.manifest)
                ok.append(d)
        return {"down_bytes": {}, "installed": ok, "refused": {}, "no_answer": [d for d in devs if d not in ok]}

    col = SimpleNamespace(send_release=send_release, device_release=dict(online), release_acks={})
    cfg = SimpleNamespace(release=SimpleNamespace(fleet=FLEET, enabled=True, every=0, int8=False, keep=3), rounds=rnd,
                          round_timeout_s=5, student=built["base"])
    svc = SimpleNamespace(out=root.parent, release_key=key, cfg=cfg, col=col, online={d: 1 for d in online}, round=rnd,
                          shutdown_round=rnd, store=Store(tmp_path / "aggregator.db"), _resends={},
                          MAX_RESENDS=Aggregator.MAX_RESENDS, student=SimpleNamespace(peft=built["peft"], tok=built["tok"]),
                          mode=SimpleNamespace(name="fedkd"), eval_examples=HELD, audit=None, metrics=Metrics())
    for name in ("deliver", "build_release", "_audit_release"):
        setattr(svc, name, lambda *a, _n=name: getattr(Aggregator, _n)(svc, *a))
    return svc, devices, Aggregator


def test_a_release_signed_before_a_stop_is_recorded_and_sent_to_every_device_that_lacks_it(built, tmp_path: Path) -> None:
    """Issue 23: the aggregator killed right after signing round 3's release (due in the store, the
    release in place, a stale .build-* beside it). The restart records that release without
    building it again, removes the stale build, and sends it to each device that says it lacks it,
    and only to those; a device that has it is not sent it again."""
    rid = built["fp32"].manifest.release_id
    sent: list = []
    svc, devices, Agg = _service(built, tmp_path, rnd=3, sent=sent, online={"device-0": "", "device-1": "r0001-fedkd"})
    from shared import ledger

    svc.audit = ledger.Ledger(tmp_path / "audit.jsonl", "aggregator", built["key"])
    svc.store.release_due(3)
    (svc.out / "releases" / ".build-r0003-fedkd").mkdir()
    Agg.resume_releases(svc)
    assert not (svc.out / "releases" / ".build-r0003-fedkd").exists()
    latest = svc.store.latest_release()
    assert latest.release_id == rid and latest.round == 3 and latest.detail == "recorded after a restart"
    assert svc.store.due_release() is None
    Agg.deliver_latest(svc)
    assert sent == [(("device-0", "device-1"), rid, 3)]
    assert all(devices[d].current()[0].release_id == rid for d in devices)
    assert svc.store.deliveries(rid) == {"device-0": "installed", "device-1": "installed"}
    # The audit log has the release (its digests) and the delivery, signed and chained.
    ledger.verify(svc.audit.path, built["key"].public)
    logged = [obj["entry"] for _, _, obj in ledger.entries(svc.audit.path)][1:]
    assert [e["kind"] for e in logged] == ["release", "delivery"]
    assert logged[0]["detail"]["release_id"] == rid and logged[0]["detail"]["note"] == "recorded after a restart"
    assert logged[0]["detail"]["files"] == {f.name: f.sha256 for f in built["fp32"].manifest.files}
    assert logged[1]["detail"]["outcome"] == {"device-0": "installed", "device-1": "installed"}
    svc.col.device_release = {"device-0": rid, "device-1": rid}
    assert Agg.deliver_latest(svc) is None and len(sent) == 1  # everyone has it: nothing sent, no wait


def test_a_release_owed_when_the_aggregator_stopped_is_built_at_start(built, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Killed during the export (due, nothing signed on disk for the round) or after the commit and
    before the release was marked due (no row for a scheduled round): built at start, once. A due
    release of an older round (a later round committed since) is closed, not built."""
    import aggregator.release as rel

    calls: list[int] = []
    real = rel.make_release
    monkeypatch.setattr(rel, "make_release", lambda *a, **k: calls.append(k["rnd"]) or real(*a, **k))
    for case in ("due", "no-row"):
        sent: list = []
        svc, devices, Agg = _service(built, tmp_path / case, rnd=5, sent=sent, online={"device-0": ""})
        if case == "due":
            svc.store.release_due(2)  # an older one, superseded
            svc.store.release_due(5)
        Agg.resume_releases(svc)
        latest = svc.store.latest_release()
        assert latest is not None and latest.release_id == "r0005-fedkd" and latest.round == 5
        Agg.resume_releases(svc)  # a second start builds nothing more
        Agg.deliver_latest(svc)
        assert devices["device-0"].current()[0].release_id == "r0005-fedkd"
        if case == "due":
            assert [r.state for r in svc.store.releases() if r.round == 2] == ["closed"]  # never left due
    assert calls == [5, 5]


def test_a_device_that_never_answers_is_resent_a_bounded_number_of_times(built, tmp_path: Path) -> None:
    """A device online that keeps not installing is sent the latest release MAX_RESENDS times per
    aggregator process, not before every round for ever; one that refused it is not sent it again."""
    sent: list = []
    svc, _, Agg = _service(built, tmp_path, rnd=3, sent=sent, online={"device-0": "", "device-1": ""}, installs=False)
    svc.store.release_built(3, built["fp32"].manifest.release_id, built["fp32"].signed)
    svc.store.delivered(built["fp32"].manifest.release_id, {"device-1": "refused: disk full"})
    for _ in range(Agg.MAX_RESENDS + 2):
        Agg.deliver_latest(svc)
    assert [s[0] for s in sent] == [("device-0",)] * Agg.MAX_RESENDS
    assert svc.store.deliveries(built["fp32"].manifest.release_id) == {"device-0": "no answer", "device-1": "refused: disk full"}


def test_what_a_killed_install_left_is_removed_and_the_release_installs_whole(built, tmp_path: Path) -> None:
    """A device killed with 1 file copied leaves ``.incoming-ID`` (and maybe a link's ``.tmp``): the
    next start removes them, nothing half-copied is ever current, and the resent release installs."""
    import shutil

    from edge_client.releases import ReleaseStore

    b, key = built["fp32"], built["key"]
    root = tmp_path / "device"
    root.mkdir()
    half = root / f".incoming-{b.manifest.release_id}"
    half.mkdir()
    first = b.manifest.files[0].name
    shutil.copyfile(b.directory / first, half / first)
    (root / ".current.tmp").symlink_to(half.name)
    store = ReleaseStore(root, key.public, FLEET)
    assert not half.exists() and not (root / ".current.tmp").is_symlink() and store.current() is None
    assert store.install(b.directory, b.signed).release_id == b.manifest.release_id
    assert store.current()[0].release_id == b.manifest.release_id


def test_a_device_status_says_its_current_release_and_old_statuses_keep_their_bytes() -> None:
    from shared import messages as M

    plain = M.DeviceStatus(device_id="d", state="online", profile="p", num_examples=0, detail="started")
    assert b"release" not in M.encode(plain)  # a status that does not say keeps its v1 bytes
    said = M.DeviceStatus(device_id="d", state="online", profile="p", num_examples=0, detail="started", release="")
    assert M.decode(M.encode(said)) == said and M.decode(M.encode(plain)).release is None
