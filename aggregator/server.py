"""The aggregator's round loop, top to bottom: plan, announce, collect, aggregate, distil,
evaluate, record.

- collection (dispatch, reassembly, presence): ``aggregator.collect``
- the secure-aggregation stage driver: ``aggregator.secure_round``
- planning (index sets, secure-aggregation parameters): ``aggregator.plan``
- the server optimizer: ``aggregator.strategy``
- the models (student, and a mode's teacher), evaluation, checkpoints: ``aggregator.model``,
  ``aggregator.checkpoint``
- what the round does besides FedAvg: a mode plug-in, ``aggregator.modes``
- the round record: ``aggregator.record``
- what an operator scrapes (``/metrics``, ``/healthz``): ``aggregator.metrics``
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from aggregator import checkpoint, plan, privacy, record, registry, secure_round, updates
from aggregator.collect import Collector, RoundBook
from aggregator.config import AggregatorConfig
from aggregator.metrics import Metrics, OpsServer
from aggregator.model import HostedModel
from aggregator.modes import Mode, ModeContext
from aggregator.record import ModelEvals, RoundRecord
from aggregator.store import RoundState, Store
from aggregator.strategy import Reply, make_strategy, weighted_mean
from shared import messages as M
from shared import secagg, sparse, update_codec
from shared.crypto import load_private_keys
from shared.secagg import hardened
from shared.datasets import Example, load_file
from shared.ledger import Ledger
from shared.errors import ConfigError, ProtocolError, SchemaError

log = logging.getLogger(__name__)

AUDIT_LOG = "audit.jsonl"  # under out_dir: the aggregator's signed, chained audit log (shared.ledger)
ROUND_SUMMARY = "round.json"  # beside a committed round's adapters: who took part (record_committed_round)


def load_eval(path: str, max_per_family: int) -> list[Example]:
    """A file, or a directory whose files are one family each (named after the file)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"evaluation data {path}: no such file or directory")
    files = sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p]
    out: list[Example] = []
    for f in files:
        exs = load_file(f, family=f.stem if p.is_dir() else None)
        by_fam: dict[str, int] = {}
        for e in exs:
            if by_fam.get(e.family, 0) < max_per_family:
                out.append(e)
                by_fam[e.family] = by_fam.get(e.family, 0) + 1
    if not out:
        raise SchemaError(f"no evaluation examples in {path}")
    return out


def load_public(path: str) -> list[Example]:
    """The aggregator's public set: a file, or a directory of files (each file's stem a family)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"public_data {path}: no such file or directory")
    files = sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p]
    return [e for f in files for e in load_file(f, family=f.stem if p.is_dir() else None)]


def release_scheduled(cfg: AggregatorConfig, rnd: int) -> bool:
    """Whether round ``rnd``, when it completes, gets a release: the last round, and every ``every``."""
    rc = cfg.release
    return rc.enabled and (rnd == cfg.rounds or (rc.every > 0 and rnd % rc.every == 0))


class Aggregator:
    def __init__(self, cfg: AggregatorConfig, fresh: bool = False) -> None:
        self.cfg = cfg
        self.fresh = fresh  # start a new store (the old one moved aside), on the operator's explicit word
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.strategy = make_strategy(cfg.server_optimizer, server_lr=cfg.server_lr, clients_per_round=cfg.clients_per_round,
                                      seed=cfg.seed, momentum=cfg.server_momentum, beta2=cfg.server_beta2, tau=cfg.server_tau)
        keys, pubkeys = None, {}
        self.authority: Any = None
        self.certs: dict[str, hardened.EnrolledCert] = {}
        self.release_key: Any = None
        self.audit: Ledger | None = None
        self._released_loss: float | None = None
        self._resends: dict[tuple[str, str], int] = {}  # (release, device) -> times deliver_latest sent it
        if cfg.insecure:
            log.warning("SECURITY OFF (insecure = true): updates are accepted unencrypted and unsigned, and "
                        "announcements go unsigned. Debug use only.")
            enrolled = set(cfg.devices)
        else:
            assert cfg.keys is not None and cfg.registry is not None
            keys = load_private_keys(cfg.keys)
            self.release_key = keys  # signs release manifests
            # What the aggregator did and saw, per round and release, signed and chained like a
            # device's ledger (shared.ledger): `fl-audit check` holds the two against each other.
            self.audit = Ledger(self.out / AUDIT_LOG, "aggregator", keys)
            pubkeys = registry.load(cfg.registry)
            if cfg.devices:
                missing = sorted(set(cfg.devices) - set(pubkeys))
                if missing:
                    raise ConfigError(f"devices {missing} are not enrolled in {cfg.registry}")
            enrolled = set(cfg.devices or pubkeys)
            if not enrolled:
                raise ConfigError(f"no devices enrolled in {cfg.registry}: run `fl-agg enroll DEVICE_ID PUBKEY_FILE`")
            if cfg.authority is not None:
                from shared.crypto import load_public_keys

                self.authority = load_public_keys(cfg.authority)
                # parsed once here, so a round's advert stage checks only each advert's signature
                self.certs = hardened.enrolled_certs(registry.certificates(cfg.registry))
                if cfg.secagg:
                    uncertified = sorted(enrolled - set(self.certs))
                    if uncertified:
                        log.warning("devices %s are enrolled without a certificate: they cannot pass secure "
                                    "aggregation (fl-authority certify, then fl-agg enroll --cert --replace)", uncertified)
                    for d, c in sorted(self.certs.items()):
                        why = c.cert.window_problem() if c.cert is not None else None
                        if why:
                            log.warning("%s's certificate is %s: its adverts are refused until it is re-certified "
                                        "(fl-authority certify, then fl-agg enroll --cert --replace)", d, why)
        self.metrics = Metrics()  # the /metrics series and /healthz (aggregator.metrics), served by serve_ops
        self.ops: OpsServer | None = None
        self.col = Collector(enrolled=enrolled, keys=keys, pubkeys=pubkeys, chunk_bytes=cfg.chunk_bytes, out_dir=self.out,
                             keep_received=cfg.keep_received, accept_plain=self._accept_plain, metrics=self.metrics)
        self.metrics.online.set_function(lambda: len(self.col.online))
        self.eval_examples = load_eval(cfg.eval_data, cfg.eval_max_per_family)
        self.eval_public = load_eval(cfg.public_eval_data, cfg.eval_max_per_family) if cfg.public_eval_data else []
        self.public = load_public(cfg.public_data) if cfg.public_data else []
        self.lora = M.LoraSpec(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules)
        self.student: HostedModel | None = None
        self.global_state: dict[str, np.ndarray] = {}  # the global student adapter (what rounds announce)
        self.mode: Mode | None = None
        self.round = 0
        self.version = 0  # how many rounds changed the model; seeds the next round (see plan.round_spec)
        self.announced = 0  # the last round number ever announced (durable, in the store)
        self.store: Store | None = None
        self.scores: np.ndarray | None = None  # momentum of aggregate magnitudes, for global top-k
        self.sketch: np.ndarray | None = None  # last round's summed magnitude sketch (secure aggregation)
        # Distributed DP: the fleet's epsilon so far, rebuilt from the recorded rounds (aggregator.privacy).
        metrics = self.out / "metrics.jsonl"
        self.privacy = (privacy.FleetAccountant.from_records(cfg.dp, record.read(metrics) if metrics.exists() else [])
                        if cfg.dp.enabled else None)
        if cfg.secagg:
            log.info("secure aggregation on%s: the aggregator learns only the sum of each round's updates",
                     " (hardened: certified adverts, consistency check)" if self.authority is not None else " (semi-honest)")
        else:
            log.warning("secure aggregation OFF (secagg = false): the aggregator sees each device's update")

    # The collector's state, under the names the rest of the system (and its tests) use.
    @property
    def book(self) -> RoundBook | None:
        return self.col.book

    @book.setter
    def book(self, b: RoundBook | None) -> None:
        self.col.book = b

    @property
    def online(self) -> dict[str, int]:
        return self.col.online

    @property
    def link(self) -> Any:
        return self.col.link

    @link.setter
    def link(self, link: Any) -> None:
        self.col.link = link

    @property
    def digest(self) -> str:
        return self.col.digest

    @digest.setter
    def digest(self, d: str) -> None:
        self.col.digest = d

    def dispatch(self, topic: str, payload: bytes, wire_bytes: int, retain: bool = False) -> None:
        self.col.dispatch(topic, payload, wire_bytes, retain)

    def drain(self) -> None:
        self.col.drain()

    def wait_for_devices(self) -> None:
        self.col.wait_for_devices(self.cfg.min_devices_to_start, self.cfg.wait_for_devices_s)

    # -- models --------------------------------------------------------------------------------
    def load_model(self) -> None:
        import torch

        from aggregator import modes

        from fl_lm.device import resolve

        c = self.cfg
        if c.torch_threads:
            torch.set_num_threads(c.torch_threads)
        # One placement for every model the aggregator runs (the teacher goes beside the student).
        placement = resolve(c.device, c.dtype)
        log.info("models on %s (%s)", placement.describe(), placement.reason)
        self.student = s = HostedModel("student", c.student, self.lora, seed=c.seed, max_seq_len=c.max_seq_len,
                                       eval_batch_size=c.eval_batch_size, placement=placement)
        self.digest = s.digest
        self.mode = modes.make(c.mode, ModeContext(cfg=c, out=self.out, student=s, public=self.public,
                                                   eval_private=self.eval_examples, eval_public=self.eval_public))
        self.store = store = checkpoint.open_store(self.out, fresh=self.fresh)
        st = store.state()
        if st is not None:
            s.load(st.checkpoint)
            if st.teacher_checkpoint:
                self.mode.resume({"teacher": st.teacher_checkpoint})
            self.round, self.version = st.round, st.version
            sp = store.arrays("sparse")  # what picks the next index set
            self.scores, self.sketch = sp.get("scores"), sp.get("sketch")
            self.strategy.load_state_arrays(store.arrays("optimizer"))
            self.col.last_seq.update(store.replay_counters())
            log.info("resumed from %s (round %d, model version %d)", st.checkpoint, st.round, st.version)
        else:
            self._checkpoint(0)
        self.announced = store.announced()
        if self.announced > self.round:
            log.warning("round %d was announced but did not complete (the aggregator stopped during it, or it was "
                        "abandoned): devices would refuse its number again, so the next round is %d, from round %d's "
                        "model", self.announced, self.announced + 1, self.round)
        self.global_state = s.state
        self.layout = sparse.Layout.from_tensors(s.state)
        log.info("student %s (digest %s), mode %s, server optimizer %s, %d eval examples", c.student, s.digest[:12],
                 c.mode, self.strategy.name, len(self.eval_examples))

    def _checkpoint(self, rnd: int, summary: dict[str, Any] | None = None) -> None:
        """Commit round ``rnd``'s model; ``summary`` (who took part) goes beside it so that a
        restart can still write the round's record if this process stops before it does."""
        assert self.student is not None and self.mode is not None
        assert self.store is not None
        extra = self.mode.checkpoint_models()
        d, td = checkpoint.save_adapters(self.out, rnd, self.student.peft, teacher=extra.get("teacher"))
        if summary is not None:
            (Path(d) / ROUND_SUMMARY).write_text(json.dumps(summary, indent=1))
        st = RoundState(round=rnd, version=self.version, checkpoint=d, teacher_checkpoint=td)
        sp = {k: v for k, v in (("scores", self.scores), ("sketch", self.sketch)) if v is not None}
        self.store.commit_round(st, {"optimizer": self.strategy.state_arrays(), "sparse": sp}, self.col.last_seq)
        checkpoint.write_mirror(self.out, st)

    SAMPLES = 4  # held-out prompts whose answers each round's record shows (the first of each family)

    def samples(self) -> list[dict[str, str]]:
        assert self.student is not None
        # One of each family first, then more from the start of the set, up to SAMPLES.
        with_prompt = [e for e in self.eval_examples if e.prompt]
        firsts: dict[str, Example] = {}
        for e in with_prompt:
            firsts.setdefault(e.family, e)
        exs = list(firsts.values())[: self.SAMPLES]
        exs += [e for e in with_prompt if e not in exs][: self.SAMPLES - len(exs)]
        # The prompt is kept as one formatted string: it is the aggregator's own held-out data.
        return [{"family": e.family, "prompt": e.prompt, "reference": e.output, "answer": a}
                for e, a in zip(exs, self.student.answers(exs))]

    def evaluate(self) -> tuple[ModelEvals, ModelEvals | None]:
        assert self.student is not None and self.mode is not None
        s = self.student
        student = ModelEvals(s.evaluate(self.eval_examples), s.evaluate(self.eval_public) if self.eval_public else None)
        return student, self.mode.evaluate()

    # -- one round -----------------------------------------------------------------------------
    def _accept_plain(self, b: RoundBook, device: str, up: M.Update | M.SparseUpdate) -> Reply:
        """A plain round's update: decoded, every value clipped to +-clip, its weight capped."""
        assert b.spec is not None
        if isinstance(up, M.SparseUpdate):
            delta = updates.sparse_delta(device, up, b.spec.sparse, b.idx, self.layout)
        else:
            delta = updates.dense_delta(device, up, self.global_state)
        delta, moved = updates.clip(delta, self.cfg.clip)
        if moved:
            log.warning("round %d: %d values of %s's update were beyond +-%g and are clipped", b.rnd, moved, device, self.cfg.clip)
        if up.num_examples > self.cfg.max_weight_examples:
            log.warning("round %d: %s claims %d examples; it weighs %d (max_weight_examples)", b.rnd, device,
                        up.num_examples, self.cfg.max_weight_examples)
        return Reply(device, min(up.num_examples, self.cfg.max_weight_examples), delta)

    def _announce(self, b: RoundBook) -> None:
        assert b.spec is not None
        for d in b.participants:
            self.col.send_to(d, "round", b.spec)
        sp = b.spec.sparse
        log.info("round %d: announced to %s (%s, %d of %d coordinates, secure aggregation %s)", b.rnd, b.participants,
                 sp.method, sp.k, sp.dim, "on" if b.spec.secagg else "OFF")

    def _collect_and_aggregate(self, b: RoundBook) -> dict[str, np.ndarray] | None:
        """The new global adapter, or None when the round does not count."""
        assert b.spec is not None
        if b.spec.secagg is not None:
            res = secure_round.run(self.col, b, self.layout, self.cfg.key_timeout_s, self.cfg.quorum, self.authority,
                                   self.certs)
            if res is None:
                return None
            b.fleet_train_loss = res.train_loss
            if res.scores is not None:
                self.mode.take_fleet(b.rnd, res.scores)
            if res.sketch is not None:
                self.sketch = res.sketch  # committed with the round
            mean = res.mean
            new = self.strategy.aggregate_mean(self.global_state, mean)
        else:
            self.col.collect("update", set(b.participants), b.deadline - time.monotonic())
            if len(b.replies) < self.cfg.quorum:
                return None
            replies = list(b.replies.values())
            new = self.strategy.aggregate(self.global_state, replies)
            total = sum(r.num_examples for r in replies)
            b.fleet_train_loss = sum(r.num_examples * update_codec.clamp_loss(b.train_loss[r.device_id]) for r in replies) / total
            mean = weighted_mean(replies) if self.cfg.sparse_method == "topk" else {}
        bad = sorted(name for name, v in new.items() if not np.isfinite(v).all())
        if bad:
            raise secure_round.AggregateRejected(f"the new global adapter has non-finite values in {bad[:3]}")
        if self.cfg.sparse_method == "topk" and self.cfg.density < 1.0:
            self.scores = sparse.update_scores(self.scores, sparse.flatten(mean, self.layout), self.cfg.topk_beta)
        return new

    def run_round(self, rnd: int) -> RoundRecord:
        assert self.student is not None and self.mode is not None
        t0 = time.monotonic()
        self.metrics.round_started(rnd)
        # plan
        c = self.cfg
        invite = math.ceil(c.clients_per_round * c.overselect) if c.clients_per_round else 0
        participants = self.strategy.configure_round(rnd, list(self.online), invite)
        self.book = b = RoundBook(rnd, participants, time.monotonic() + self.cfg.round_timeout_s,
                                  enough=c.clients_per_round if c.overselect > 1.0 else 0)
        new: dict[str, np.ndarray] | None = None
        reason = ""
        spent: dict[str, Any] | None = None
        try:
            if self.cfg.secagg and len(participants) < 2:
                raise secagg.SecAggAbort(f"{len(participants)} participant(s); secure aggregation needs at least 2")
            scoring = self.mode.scoring(rnd) if self.cfg.secagg else None  # fl-minillm client rounds
            b.spec = plan.round_spec(self.cfg, rnd, participants, global_state=self.global_state, layout=self.layout,
                                     lora=self.lora, digest=self.digest, online=self.online, scores=self.scores,
                                     sketch=self.sketch, scoring=scoring, version=self.version)
            b.idx = update_codec.round_indices(b.spec.sparse)
            b.max_upload = plan.upload_cap(b.spec, self.global_state)
            dp_round = self.privacy is not None and b.spec.secagg is not None and b.spec.secagg.dp is not None
            if dp_round:
                self.privacy.admit(b.spec)  # type: ignore[union-attr]  # BudgetSpent: stop before announcing
            # announce, collect, aggregate
            assert self.store is not None
            self.store.mark_announced(rnd, self.col.last_seq)
            self.announced = rnd
            self._announce(b)
            if dp_round:
                spent = self.privacy.charge(b.spec)  # type: ignore[union-attr]
            new = self._collect_and_aggregate(b)
            if new is None:
                reason = f"{len(b.replies)} of {len(participants)} updates received, quorum is {self.cfg.quorum}"
        except secagg.SecAggAbort as e:
            new, reason = None, f"secure aggregation aborted: {e}"
        except secure_round.AggregateRejected as e:
            new, reason = None, f"aggregate rejected: {e}"
        except ProtocolError as e:  # e.g. unmask shares that rebuild a key not matching its public key
            new, reason = None, f"secure aggregation failed: {type(e).__name__}: {e}"
        finally:
            self.book = None
        received = sorted(b.received if b.received is not None else b.replies)
        drop_reasons = {d: b.reasons.get(d, "not in the sum") for d in sorted(set(participants) - set(received))}
        # distil
        distil = None
        if new is None:
            log.error("round %d abandoned: %s; global model unchanged", rnd, reason)
            assert self.store is not None
            self.store.abandon(rnd, reason, self.col.last_seq)
        else:
            self.student.set_state(new)
            self.metrics.progress("distil")
            distil = self.mode.distil(rnd)  # may move the student: the distilled one is the next global model
            sc = b.spec.scoring if b.spec is not None else None
            if distil is not None and sc is not None and b.spec is not None and b.spec.secagg is not None:
                # What the fleet-as-teacher costs each device: the rollouts down, the masked scores up.
                distil["scoring_values"] = sc.values
                distil["scoring_up_bytes_per_device"] = sparse.ring_bytes(sc.values, b.spec.secagg.ring_bits)
                distil["scoring_down_bytes_per_device"] = sum(len(t.data) for t in sc.tensors)
            self.global_state = self.student.state
            self.version += 1
            self._checkpoint(rnd, summary={"participants": participants, "received": received,
                                           "drop_reasons": drop_reasons, "secagg": b.spec is not None and b.spec.secagg is not None})
        self.round = rnd
        # evaluate, record
        self.metrics.progress("evaluate")
        student, teacher = self.evaluate()
        sp = b.spec.sparse if b.spec else None
        return RoundRecord(
            round=rnd, status="ok" if new is not None else "abandoned", mode=self.mode.name, student=student,
            teacher=teacher, participants=participants, received=sorted(received),
            dropped=sorted(set(participants) - set(received)),
            drop_reasons=drop_reasons,
            rejected_messages=b.rejected, bytes_up=b.bytes_up,
            bytes_down=b.bytes_down, bytes_by_kind=b.bytes_by_kind, train_loss=b.train_loss,
            fleet_train_loss=b.fleet_train_loss if new is not None else None,
            sparse={"method": sp.method, "k": sp.k, "dim": sp.dim} if sp else None,
            secagg=b.spec is not None and b.spec.secagg is not None, abandon_reason=reason if new is None else None,
            distil=distil, time_s=round(time.monotonic() - t0, 3), samples=self.samples(), privacy=spent)

    # -- the service ---------------------------------------------------------------------------
    def _release_due(self, rnd: int, rec: RoundRecord) -> bool:
        return rec.status == "ok" and release_scheduled(self.cfg, rnd)

    def release(self, rnd: int, rec: RoundRecord) -> dict[str, Any]:
        """The global student as a signed ONNX release under out/releases (aggregator.release),
        sent to the devices online; the store keeps it as due, then built, and who installed it."""
        rc = self.cfg.release
        if self.release_key is None:
            log.warning("no release: releases are signed and insecure mode has no aggregator key")
            return {"published": False, "reason": "insecure: no signing key"}
        assert self.store is not None
        if rc.only_if_improved and rnd != self.cfg.rounds and self._released_loss is not None \
                and rec.mean_loss >= self._released_loss:
            reason = f"held-out loss {rec.mean_loss:.4f} not below the last release's {self._released_loss:.4f}"
            self.store.release_skipped(rnd, reason)
            return {"published": False, "reason": reason}
        t = time.monotonic()
        built = self.build_release(rnd)
        if built is None:
            return {"published": False, "reason": "parity gate failed (see the aggregator log)"}
        self._released_loss = rec.mean_loss
        m = built.manifest
        delivery = self.deliver(built, sorted(self.online), rnd)
        return {"published": True, "release_id": m.release_id, "bytes": sum(f.size for f in m.files),
                "files": {f.name: f.size for f in m.files}, "quantization": m.quantization, "parity": m.parity,
                "seconds": round(time.monotonic() - t, 1), **delivery}

    def build_release(self, rnd: int) -> Any:
        """Build and sign round ``rnd``'s release from the current student; None when the parity
        gate fails. Marked due in the store first, so a stop while building is made good at the
        next start (``resume_releases``)."""
        from aggregator.release import make_release

        assert self.student is not None and self.mode is not None and self.store is not None
        rc = self.cfg.release
        self.store.release_due(rnd)
        built = make_release(self.student.peft, self.student.tok, base=self.cfg.student, root=self.out / "releases", rnd=rnd,
                             mode=self.mode.name, fleet=rc.fleet, key=self.release_key, heldout=self.eval_examples,
                             int8=rc.int8, keep=rc.keep)
        if built is None:
            self.store.release_skipped(rnd, "parity gate failed")
            return None
        self.store.release_built(rnd, built.manifest.release_id, built.signed)
        self.metrics.released("release")
        self._audit_release(built, rnd)
        return built

    def _audit_release(self, built: Any, rnd: int, detail: str = "") -> None:
        if self.audit is not None:
            m = built.manifest
            self.audit.append("release", rnd, sum(f.size for f in m.files), hashlib.sha256(built.signed).hexdigest(),
                              {"release_id": m.release_id, "files": {f.name: f.sha256 for f in m.files},
                               **({"rollback_of": m.rollback_of} if m.rollback_of else {}), **({"note": detail} if detail else {})})

    def deliver(self, built: Any, devices: list[str], rnd: int) -> dict[str, Any]:
        """Send a built release to ``devices``, wait for their answers, and keep them in the store."""
        assert self.store is not None
        m = built.manifest
        msg = M.Release(manifest=built.signed,
                        files=tuple(M.ReleaseFile(f.name, (built.directory / f.name).read_bytes()) for f in m.files))
        delivery = self.col.send_release(devices, msg, rnd, m.release_id, self.cfg.round_timeout_s)
        outcome = {d: "installed" for d in delivery["installed"]}
        outcome |= {d: f"refused: {why}" for d, why in delivery["refused"].items()}
        outcome |= {d: "no answer" for d in delivery["no_answer"]}
        self.store.delivered(m.release_id, outcome)
        self.metrics.delivered(delivery)
        if self.audit is not None:
            self.audit.append("delivery", rnd, 0, "", {"release_id": m.release_id, "outcome": outcome})
        log.info("release %s: installed on %d of %d devices%s%s", m.release_id, len(delivery["installed"]), len(devices),
                 f"; refused by {delivery['refused']}" if delivery["refused"] else "",
                 f"; no answer from {delivery['no_answer']} (sent again when they say they lack it)" if delivery["no_answer"] else "")
        return delivery

    def resume_releases(self) -> None:
        """At start: remove stale builds, build the release that was owed when the aggregator
        stopped (killed while exporting, or after the commit and before the release), and record
        one that was signed but not recorded (killed right after signing). Issue 23."""
        from aggregator import release as rel

        root = self.out / "releases"
        gone = rel.clean_stale(root)
        if gone:
            log.warning("removed %s: release builds the last aggregator process did not finish", ", ".join(gone))
        if self.store is None or self.release_key is None or not self.cfg.release.enabled or self.round == 0:
            return
        rows, due = self.store.releases(), self.store.due_release()
        if due is not None and due.round != self.round:
            self.store.release_skipped(due.round, f"the aggregator stopped while building it; round {self.round}'s "
                                                  "model is the current one")
            due = None
        owed = due is not None or (release_scheduled(self.cfg, self.round) and not any(r.round == self.round for r in rows))
        if not owed:
            return
        found = rel.find_built(root, self.round, self.release_key.public, self.cfg.release.fleet)
        if found is not None:
            log.warning("release %s was signed before the aggregator stopped; recording it", found.manifest.release_id)
            rel.write_latest(root, found)
            self.store.release_built(self.round, found.manifest.release_id, found.signed, detail="recorded after a restart")
            self._audit_release(found, self.round, "recorded after a restart")
        else:
            log.warning("round %d's release was owed when the aggregator stopped: building it now", self.round)
            self.build_release(self.round)

    # A device online that never answers (or keeps failing to install) is sent the latest release
    # this many times per aggregator process, so it cannot stall every round by a delivery wait.
    MAX_RESENDS = 3

    def deliver_latest(self) -> dict[str, Any] | None:
        """Send the latest release to every online device that says it has another one, or none
        (it missed the delivery, was killed while installing, or restarted): resent until each
        has it, or refused it."""
        from aggregator import release as rel

        if self.store is None or self.release_key is None:
            return None
        latest = self.store.latest_release()
        if latest is None or latest.release_id is None or latest.manifest is None:
            return None
        rid = latest.release_id
        done = self.store.deliveries(rid)
        lacking = sorted(d for d in self.online
                         if d in self.col.device_release and self.col.device_release[d] != rid
                         and self.col.release_acks.get(d) != f"installed {rid}" and not done.get(d, "").startswith("refused")
                         and self._resends.get((rid, d), 0) < self.MAX_RESENDS)
        if not lacking:
            return None
        try:
            built = rel.load_built(self.out / "releases", latest.manifest, self.release_key.public, self.cfg.release.fleet)
        except (ProtocolError, ConfigError) as e:
            log.error("release %s cannot be sent again: %s", rid, e)
            return None
        for d in lacking:
            self._resends[(rid, d)] = self._resends.get((rid, d), 0) + 1
        log.warning("release %s: sending it to %s, which say they have %s", rid, lacking,
                    ", ".join(sorted({self.col.device_release[d] or "none" for d in lacking})))
        return self.deliver(built, lacking, self.shutdown_round)

    def rollback_if_requested(self) -> dict[str, Any] | None:
        """Announce the signed rollback ``fl-agg rollback`` asked for, if any (aggregator.release)."""
        from aggregator import release as rel

        root = self.out / "releases"
        req_path = root / rel.ROLLBACK_REQUEST
        if not req_path.exists() or self.release_key is None:
            return None
        assert self.store is not None
        req = json.loads(req_path.read_text())
        req_path.unlink()
        try:
            built = rel.make_rollback(root, str(req["to"]), str(req["replaces"]), self.release_key, self.cfg.release.fleet)
        except (ConfigError, ProtocolError) as e:
            log.error("rollback to %s NOT announced: %s", req.get("to"), e)
            return None
        m = built.manifest
        self.store.release_built(self.round, m.release_id, built.signed, detail=f"rollback of {m.rollback_of}")
        self.metrics.released("rollback")
        self._audit_release(built, self.round)
        delivery = self.deliver(built, sorted(self.online), self.shutdown_round)
        entry = {"to": m.release_id, "replaces": m.rollback_of, "reason": req.get("reason", ""), "after_round": self.round,
                 **delivery}
        rel.record_rollback(root, entry)
        self._released_loss = None  # the next release is judged afresh
        log.warning("rollback from %s to %s announced (%s): installed on %d of %d devices", m.rollback_of, m.release_id,
                    entry["reason"] or "no reason given", len(delivery["installed"]), len(self.online))
        return entry

    def connect(self) -> None:
        from fl_mqtt.link import MqttLink

        from shared import topics

        c = self.cfg
        user, password, ca_file = c.mqtt_login()
        self.link = MqttLink("aggregator", c.broker, username=user, password=password, ca_file=ca_file, protocol=c.protocol,
                             allow_plaintext_password=c.allow_plaintext_password)
        self.link.connect()
        self.link.subscribe(topics.up_filter())

    def _record(self, metrics: Path, rec: RoundRecord) -> None:
        """The round's record in ``metrics.jsonl`` and, signed and chained, in the audit log."""
        record.append(metrics, rec)
        self.metrics.observe_round(rec)
        if self.audit is not None:
            self.audit.append("round", rec.round, 0, "", {
                "status": rec.status, "mode": rec.mode, "participants": rec.participants, "received": rec.received,
                "drop_reasons": rec.drop_reasons, "secagg": rec.secagg,
                # What the aggregator saw in clear: the sum only under secure aggregation.
                "decrypted": "aggregate only" if rec.secagg else ("each update" if rec.received else "nothing"),
                "model_sha256": self._model_digest() if rec.status in ("ok", "baseline") else None,
                **({"privacy": {k: rec.privacy[k] for k in ("epsilon", "delta", "rounds", "noise_multiplier", "quorum")}}
                   if rec.privacy else {}),
                **({"abandon_reason": rec.abandon_reason} if rec.abandon_reason else {}),
                **({"release": {k: rec.release[k] for k in ("published", "release_id", "reason", "installed") if k in rec.release}}
                   if rec.release else {})})

    def stop_for_privacy(self, rnd: int, why: str) -> None:
        """The fleet's epsilon target is reached: no round ``rnd`` (it was never announced)."""
        log.error("privacy budget reached: stopping the fleet before round %d: %s", rnd, why)
        if self.audit is not None:
            self.audit.append("privacy_stop", rnd, 0, "", {"reason": why, "epsilon": self.privacy.epsilon if self.privacy else None})

    def _model_digest(self) -> str | None:
        st = self.store.state() if self.store is not None else None
        f = Path(st.checkpoint) / "adapter_model.safetensors" if st is not None else None
        return hashlib.sha256(f.read_bytes()).hexdigest() if f is not None and f.exists() else None

    def record_committed_round(self, metrics: Path) -> None:
        """A restart after the last committed round's model was saved but before its record was
        written (the aggregator stopped while evaluating or releasing): write that record now, from
        the saved summary and a fresh evaluation of the committed model, and say so in it."""
        assert self.mode is not None
        if self.round == 0 or record.last_round(metrics) >= self.round:
            return
        st = self.store.state() if self.store is not None else None
        summary_file = Path(st.checkpoint) / ROUND_SUMMARY if st is not None else None
        summary = json.loads(summary_file.read_text()) if summary_file is not None and summary_file.exists() else {}
        log.warning("round %d was committed (its model is the resumed one) but its record was not written: the "
                    "aggregator stopped after the commit; recording it now, evaluated again (its release, if one was due, is built once the devices are back)", self.round)
        student, teacher = self.evaluate()
        participants, received = list(summary.get("participants", [])), list(summary.get("received", []))
        self._record(metrics, RoundRecord(
            round=self.round, status="ok", mode=self.mode.name, student=student, teacher=teacher, participants=participants,
            received=received, dropped=sorted(set(participants) - set(received)),
            drop_reasons=dict(summary.get("drop_reasons", {})), secagg=bool(summary.get("secagg", False)),
            samples=self.samples(),
            note="recorded after a restart: the aggregator stopped after committing this round and before writing its "
                 "record; byte counts, training losses and distillation figures were lost with it"))

    @property
    def shutdown_round(self) -> int:
        """The round the shutdown broadcast is bound to: the last one announced, not the last
        completed. A device that heard an announcement refuses anything bound to an earlier round
        (it would be a replay): after a failed commit, devices refused the shutdown (issue 23)."""
        return max(self.round, self.announced)

    def record_interrupted_round(self, metrics: Path) -> None:
        """A round announced before a stop that neither committed nor left a record (a kill in
        collection or unmasking): before, only the store's phases showed it. Recorded now as
        ``interrupted``, with the committed model's scores (it is the model the round left)."""
        assert self.mode is not None and self.store is not None
        a = self.announced
        if a <= self.round or record.last_round(metrics) >= a:
            return
        why = next((d for _, p, d in reversed(self.store.phases(a)) if p == "abandoned"), "")
        log.warning("round %d was announced but the aggregator stopped before it ended: recording it as interrupted", a)
        student, teacher = self.evaluate()
        self._record(metrics, RoundRecord(
            round=a, status="interrupted" if not why else "abandoned", mode=self.mode.name, student=student, teacher=teacher,
            abandon_reason=why or "the aggregator stopped during the round; the model is the last committed round's",
            note="recorded after a restart: the round's participants, bytes and losses were lost with the process"))

    def serve_ops(self) -> None:
        """``/metrics`` and ``/healthz`` on ``metrics_host:metrics_port`` (aggregator.metrics); off when the port is 0."""
        if self.cfg.metrics_port and self.ops is None:
            self.ops = OpsServer(self.cfg.metrics_host, self.cfg.metrics_port, self.metrics, lambda: self.col.link)

    def run(self) -> None:
        self.serve_ops()
        self.load_model()
        self.connect()
        metrics = self.out / "metrics.jsonl"
        try:
            self.record_committed_round(metrics)
            self.record_interrupted_round(metrics)
            if self.round == 0 and self.announced == 0:
                assert self.mode is not None
                student, teacher = self.evaluate()
                self._record(metrics, RoundRecord(round=0, status="baseline", mode=self.mode.name, student=student, teacher=teacher,
                                                   samples=self.samples()))
                log.info("round 0 (before training): mean held-out loss %.4f", student.private.mean_loss)
            self.wait_for_devices()
            self.resume_releases()
            for rnd in range(checkpoint.next_round(self.round, self.announced), self.cfg.rounds + 1):
                if len(self.online) < self.cfg.quorum:
                    self.wait_for_devices()
                self.rollback_if_requested()
                self.deliver_latest()  # to a device that missed one (nothing to do, and no wait, when all have it)
                try:
                    rec = self.run_round(rnd)
                except privacy.BudgetSpent as e:
                    self.stop_for_privacy(rnd, str(e))
                    break
                if self._release_due(rnd, rec):
                    rec = dataclasses.replace(rec, release=self.release(rnd, rec))
                self._record(metrics, rec)
                em = rec.mean_exact_match
                log.info("round %d %s: %d/%d updates, mean held-out loss %.4f, exact match %s%s",
                         rnd, rec.status, len(rec.received), len(rec.participants), rec.mean_loss,
                         "n/a" if em is None else f"{em:.3f}",
                         f", teacher loss {rec.teacher.private.mean_loss:.4f}" if rec.teacher else "")
            self.rollback_if_requested()
            self.deliver_latest()  # every device ends the run with the latest release
        finally:
            self.col.broadcast_shutdown(self.shutdown_round)
            self.link.close()
            if self.ops is not None:
                self.ops.close()
