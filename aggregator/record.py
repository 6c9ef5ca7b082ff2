"""The typed round record: what one round did, as written to ``metrics.jsonl`` and read back.

One JSON object per line. The student's held-out scores on the private families stay at the top
level (``eval``, ``mean_loss``, ``mean_exact_match``) as before; the student on the public
families, the teacher on both, and what distillation did and how long it took are nested.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.model import EvalSummary

WIRE_NOTE = "MQTT PUBLISH packets (header+topic+payload), excluding TCP/TLS and acks"


@dataclass(frozen=True)
class ModelEvals:
    """One model's held-out scores: on the devices' (private) families and on the public ones."""

    private: EvalSummary
    public: EvalSummary | None = None

    def to_json(self) -> dict[str, Any]:
        return {"private": self.private.to_json(), "public": self.public.to_json() if self.public else None}

    @staticmethod
    def from_json(d: dict[str, Any]) -> ModelEvals:
        return ModelEvals(EvalSummary.from_json(d["private"]), EvalSummary.from_json(d["public"]) if d.get("public") else None)


@dataclass(frozen=True)
class RoundRecord:
    round: int
    # baseline (round 0, before training), ok, abandoned, or interrupted (the aggregator stopped
    # during the round, and a restart recorded it: the model is the last committed one)
    status: str
    mode: str
    student: ModelEvals
    participants: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    drop_reasons: dict[str, str] = field(default_factory=dict)  # device -> declined/offline/rejected/timeout reason
    rejected_messages: int = 0
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    bytes_by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    train_loss: dict[str, float] = field(default_factory=dict)  # per device: plain rounds only
    fleet_train_loss: float | None = None  # weighted mean; under secure aggregation from the masked tail
    sparse: dict[str, Any] | None = None
    secagg: bool = False
    abandon_reason: str | None = None
    teacher: ModelEvals | None = None
    distil: dict[str, Any] | None = None  # phase name -> PhaseStats fields, plus total seconds
    time_s: float = 0.0
    # The global student's answers to a few fixed held-out prompts: [{family, prompt, reference, answer}].
    samples: list[dict[str, str]] = field(default_factory=list)
    # The ONNX release made after this round, if one was due: id, bytes, files, parity; or why not.
    release: dict[str, Any] | None = None
    # Set when the record is not the round's own (written by a restarted aggregator): what is missing.
    note: str | None = None
    # Distributed DP rounds: the fleet's epsilon after this round and the round's mechanism
    # (aggregator.privacy.FleetAccountant.charge); absent from rounds without DP.
    privacy: dict[str, Any] | None = None

    # The student's private-family scores, under the names every reader has used.
    @property
    def eval(self) -> dict[str, Any]:
        return self.student.private.to_json()["eval"]

    @property
    def mean_loss(self) -> float:
        return self.student.private.mean_loss

    @property
    def mean_exact_match(self) -> float | None:
        return self.student.private.mean_exact_match

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"round": self.round, "status": self.status, "mode": self.mode,
                             "participants": self.participants, "received": self.received, "dropped": self.dropped,
                             "drop_reasons": self.drop_reasons, "rejected_messages": self.rejected_messages, "bytes_up": self.bytes_up,
                             "bytes_down": self.bytes_down, "bytes_by_kind": self.bytes_by_kind,
                             "train_loss": self.train_loss, "fleet_train_loss": self.fleet_train_loss,
                             "sparse": self.sparse, "secagg": self.secagg,
                             "wire_bytes_note": WIRE_NOTE}
        if self.abandon_reason is not None:
            d["abandon_reason"] = self.abandon_reason
        d.update(self.student.private.to_json())
        d["student_public"] = self.student.public.to_json() if self.student.public else None
        d["teacher"] = self.teacher.to_json() if self.teacher else None
        d["distil"] = self.distil
        d["time_s"] = self.time_s
        d["samples"] = self.samples
        d["release"] = self.release
        if self.note is not None:
            d["note"] = self.note
        if self.privacy is not None:
            d["privacy"] = self.privacy
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> RoundRecord:
        private = EvalSummary.from_json(d)
        public = EvalSummary.from_json(d["student_public"]) if d.get("student_public") else None
        return RoundRecord(
            round=int(d["round"]), status=str(d["status"]), mode=str(d.get("mode", "fedit")),
            student=ModelEvals(private, public), participants=list(d.get("participants", [])),
            received=list(d.get("received", [])), dropped=list(d.get("dropped", [])),
            drop_reasons=dict(d.get("drop_reasons", {})), rejected_messages=int(d.get("rejected_messages", 0)), bytes_up=dict(d.get("bytes_up", {})),
            bytes_down=dict(d.get("bytes_down", {})), bytes_by_kind=dict(d.get("bytes_by_kind", {})),
            train_loss=dict(d.get("train_loss", {})), fleet_train_loss=d.get("fleet_train_loss"),
            sparse=d.get("sparse"), secagg=bool(d.get("secagg", False)),
            abandon_reason=d.get("abandon_reason"),
            teacher=ModelEvals.from_json(d["teacher"]) if d.get("teacher") else None,
            distil=d.get("distil"), time_s=float(d.get("time_s", 0.0)),
            samples=[dict(x) for x in d.get("samples", [])], release=d.get("release"), note=d.get("note"),
            privacy=d.get("privacy"))


def append(path: Path, rec: RoundRecord) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec.to_json()) + "\n")


def last_round(path: Path) -> int:
    """The highest round number recorded in ``path`` (0 when none is)."""
    if not path.exists():
        return 0
    return max((int(json.loads(line)["round"]) for line in path.read_text().splitlines() if line.strip()), default=0)


def read(path: Path) -> list[RoundRecord]:
    return [RoundRecord.from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
