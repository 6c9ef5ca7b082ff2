"""Typed, versioned messages and their byte encoding.

Envelope: a msgpack map ``{"v": PROTOCOL_VERSION, "k": kind, "b": body}``; ``body`` holds exactly
the fields of the kind's frozen dataclass. Decoding validates the version, the kind, every field
name and every field's type, and rejects the rest with a typed ``ProtocolError`` subclass.
Tensors are raw little-endian buffers (``shared.tensors.TensorBlob``); nothing is ever pickled.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import msgpack

from shared.dp import DPSpec
from shared.errors import ProtocolError, SchemaError, TruncatedError, VersionError
from shared.tensors import TensorBlob

PROTOCOL_VERSION = 1
# Refuse anything bigger before msgpack allocates for it; chunking handles larger payloads.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Message:
    KIND: ClassVar[str] = ""


@dataclass(frozen=True)
class LoraSpec:
    """The adapter shape every participant must train, so updates can be summed."""

    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.r <= 1024:
            raise SchemaError(f"LoraSpec.r must be in 1..1024, got {self.r}")
        if not self.target_modules:
            raise SchemaError("LoraSpec.target_modules must not be empty")
        if not 0.0 <= self.dropout < 1.0:
            raise SchemaError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class DeviceStatus(Message):
    """A device's presence and state; ``offline`` is also its retained last will."""

    KIND: ClassVar[str] = "status"
    device_id: str
    state: Literal["online", "offline", "training", "declined", "release"]  # release: detail says installed or refused
    profile: str
    num_examples: int
    detail: str
    # The release the device has installed as current ("" none), in its "online" statuses: the
    # aggregator resends the latest to a device that lacks it (issue 23). Absent (None) from a
    # status that does not say, which keeps those statuses' bytes as they were.
    release: str | None = None


# The details of an "online" status that the aggregator acts on (aggregator/collect.py): a new
# process that holds nothing of a round it was in (a dropout of that round), the same process back
# after a broker outage, or a new process that continues a round from its training checkpoint.
STARTED, RECONNECTED = "started", "reconnected"
_RESUMING = re.compile(r"resuming round (\d+) at step (\d+)")


def resuming(rnd: int, step: int) -> str:
    return f"resuming round {rnd} at step {step}"


def resumed_round(detail: str) -> int | None:
    """The round a status detail says the device resumes, or None when it says nothing of the kind."""
    m = _RESUMING.fullmatch(detail)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class SparseSpec:
    """Which coordinates of the flattened adapter (``shared.sparse.Layout``) devices send this round.

    ``dense``: all of them. ``random``: ``shared.sparse.random_k(dim, k, seed)``; ``topk``: the
    aggregator's global top-k; both listed in ``indices`` (``shared.sparse.encode_indices``), so a
    device never recomputes a set with a numpy that might draw differently. ``device_topk``: each
    device picks its own k and sends their indices (secure aggregation off only: masks cancel only
    on coordinates every device sends). Updates on a shared set carry no index bytes.
    """

    method: Literal["dense", "random", "topk", "device_topk"]
    dim: int
    k: int
    seed: int
    indices: bytes
    value_dtype: Literal["float32", "float16"]  # values without secure aggregation

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.dim:
            raise SchemaError(f"SparseSpec.k must be in 1..dim={self.dim}, got {self.k}")
        if self.method == "dense" and self.k != self.dim:
            raise SchemaError("SparseSpec: dense means k == dim")
        if (self.method in ("random", "topk")) != bool(self.indices):
            raise SchemaError("SparseSpec.indices is set exactly when method is random or topk")


@dataclass(frozen=True)
class SecAggSpec:
    """Secure-aggregation settings of a round (``shared.secagg``), the same for every participant.

    node_ids[i] is the SecAgg node of participants[i]. Values are clipped to [-clip, clip], scaled
    by the device's weight min(num_examples, weight_norm) / weight_norm (so the sum is an
    example-weighted sum), quantized to ``value_bits`` bits and masked in Z_2^ring_bits;
    n * (2^value_bits - 1) < 2^ring_bits so the sum cannot wrap.

    sketch_block > 0 appends, after the k values, one value per block of that many adapter
    coordinates: the mean |delta + residual| over the block (weighted and clipped the same way).
    Summed under the masks, it tells the aggregator where the fleet's unsent mass is, and so which
    coordinates to ask for next round, without revealing any one device's.

    dp: distributed differential privacy (``shared.dp``): each device L2-clips, rotates, scales
    and noises its whole input into the ring instead of the per-coordinate fixed-point encoding;
    the masked vector is then ``shared.dp.ring_dim`` long, and value_bits is unused. Absent (None)
    from rounds without it, which keeps those specs' bytes as they were.
    """

    node_ids: tuple[int, ...]
    threshold: int
    graph_seed: bytes
    clip: float
    ring_bits: int
    value_bits: int
    weight_norm: int
    sketch_block: int
    dp: DPSpec | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.ring_bits <= 32 or not 1 <= self.value_bits <= self.ring_bits:
            raise SchemaError(f"SecAggSpec: bad ring_bits {self.ring_bits} / value_bits {self.value_bits}")
        if len(self.node_ids) * ((1 << self.value_bits) - 1) > (1 << self.ring_bits) - 1:
            raise SchemaError("SecAggSpec: the sum of all inputs would wrap the ring")
        if not self.clip > 0 or self.weight_norm < 1 or self.sketch_block < 0:
            raise SchemaError("SecAggSpec: clip must be > 0, weight_norm >= 1 and sketch_block >= 0")


# A scoring vector must stay far below one update: the device runs one forward pass over it.
MAX_SCORING_VALUES = 1 << 22


@dataclass(frozen=True)
class ScoringSpec:
    """fl-minillm client-teacher round: the aggregator's rollouts on public prompts, to be scored.

    ``tensors`` holds ``ids`` (rollouts, prompts) int32 tokens, prompt then response, every
    prompt ``prompt_len`` tokens long; ``candidates`` (rollouts, positions, k) int32 ids per
    response position (the aggregator's top-k, the sampled token always among them); ``mask``
    (rollouts, positions) uint8, 0 past a rollout's end. Each device returns, through secure
    aggregation, its probabilities on the candidates plus the rest mass per position
    (``fl_lm.fleet_teacher``): rollouts x positions x (k + 1) values after the update's values.
    """

    rollouts: int
    positions: int
    k: int
    prompt_len: int
    tensors: tuple[TensorBlob, ...]

    def __post_init__(self) -> None:
        if min(self.rollouts, self.positions, self.k, self.prompt_len) < 1:
            raise SchemaError("ScoringSpec: rollouts, positions, k and prompt_len must be >= 1")
        if self.values > MAX_SCORING_VALUES:
            raise SchemaError(f"ScoringSpec: {self.values} scoring values exceed {MAX_SCORING_VALUES}")
        want = {"ids": ("int32", (self.rollouts, self.prompt_len + self.positions)),
                "candidates": ("int32", (self.rollouts, self.positions, self.k)),
                "mask": ("uint8", (self.rollouts, self.positions))}
        got = {t.name: (t.dtype, t.shape) for t in self.tensors}
        if got != want or len(self.tensors) != len(want):
            raise SchemaError(f"ScoringSpec: tensors {got} do not match {want}")

    @property
    def values(self) -> int:
        """Length of the scoring vector each device adds to its secure input."""
        return self.rollouts * self.positions * (self.k + 1)


@dataclass(frozen=True)
class RoundSpec(Message):
    """Broadcast by the aggregator to start a round. Carries the global adapter to start from."""

    KIND: ClassVar[str] = "round"
    round: int
    participants: tuple[str, ...]
    local_steps: int
    learning_rate: float
    lora: LoraSpec
    base_digest: str  # sha256 of the student base weights; devices refuse a mismatch
    deadline_s: float  # seconds from receipt the aggregator waits for this round's updates
    seed: int
    adapter: tuple[TensorBlob, ...]  # global LoRA weights, PEFT state-dict names
    sparse: SparseSpec
    secagg: SecAggSpec | None  # None: secure aggregation off for this round
    scoring: ScoringSpec | None = None  # fl-minillm client-teacher rounds only (needs secagg)

    def __post_init__(self) -> None:
        if self.scoring is not None and self.secagg is None:
            raise SchemaError("RoundSpec: a scoring round needs secure aggregation (devices' outputs are only summed)")


@dataclass(frozen=True)
class Update(Message):
    """One device's adapter update for one round."""

    KIND: ClassVar[str] = "update"
    round: int
    device_id: str
    seq: int
    num_examples: int
    steps: int
    train_loss: float
    payload: Literal["delta"]  # difference to the round's global adapter, dense fp32
    base_digest: str
    tensors: tuple[TensorBlob, ...]


@dataclass(frozen=True)
class _CompactUpdate(Message):
    """Fields every compact update carries (the dense ``Update`` predates them and keeps its layout)."""

    round: int
    device_id: str
    seq: int
    num_examples: int
    steps: int
    train_loss: float
    base_digest: str


@dataclass(frozen=True)
class SparseUpdate(_CompactUpdate):
    """A sparse update without secure aggregation: values on the round's index set, or top-k.

    ``encoding`` ``shared``: ``values`` holds k values (the spec's value_dtype, little-endian) on
    the round's shared index set. ``topk``: ``values`` is ``shared.sparse.topk_encode`` output.
    """

    KIND: ClassVar[str] = "sparse_update"
    encoding: Literal["shared", "topk"]
    values: bytes


@dataclass(frozen=True)
class MaskedUpdate(_CompactUpdate):
    """A securely aggregated update: the device's masked vector in Z_2^ring_bits, packed.

    The aggregator can only add it to the others; alone it is uniformly random.
    """

    KIND: ClassVar[str] = "masked_update"
    masked: bytes  # shared.sparse.pack_ring(y, ring_bits)


@dataclass(frozen=True)
class SecAggMsg(Message):
    """One secure-aggregation stage message (``shared.secagg.encode``) in either direction.

    ``device_id`` is the sender for uploads and the recipient for downloads.
    """

    KIND: ClassVar[str] = "secagg"
    round: int
    device_id: str
    body: bytes


@dataclass(frozen=True)
class Shutdown(Message):
    """Broadcast when the aggregator is done; simulated devices exit on it."""

    KIND: ClassVar[str] = "shutdown"
    reason: str


@dataclass(frozen=True)
class Sealed(Message):
    """An inner message encrypted to the aggregator and signed by its sender (``shared.secure``).

    ``round``, ``device_id`` and ``kind`` travel in clear so the receiver can rebuild the
    associated data; they are bound into the AEAD and the signature, so changing them fails.
    """

    KIND: ClassVar[str] = "sealed"
    round: int
    device_id: str
    kind: str
    blob: bytes


@dataclass(frozen=True)
class Signed(Message):
    """An inner message in clear, signed by its sender and bound to (version, round, device, kind)."""

    KIND: ClassVar[str] = "signed"
    round: int
    device_id: str
    kind: str
    blob: bytes


@dataclass(frozen=True)
class ReleaseFile:
    name: str
    data: bytes


@dataclass(frozen=True)
class Release(Message):
    """An ONNX release for one device: the aggregator-signed manifest (``shared.release``) and the
    files it names. The manifest's signature and each file's SHA-256 are what the device trusts;
    this envelope is signed too, so it cannot be replayed to another device."""

    KIND: ClassVar[str] = "release"
    manifest: bytes
    files: tuple[ReleaseFile, ...]


KINDS: dict[str, type[Message]] = {c.KIND: c for c in (DeviceStatus, RoundSpec, Update, Shutdown, Sealed, Signed,
                                                         SparseUpdate, MaskedUpdate, SecAggMsg, Release)}
UPDATE_KINDS: tuple[type[Message], ...] = (Update, SparseUpdate, MaskedUpdate)


def _absent_ok(f: dataclasses.Field[Any]) -> bool:
    """A field added to version 1 later, with default None: omitted when None, so every message
    that does not use it keeps its exact v1 bytes; a receiver that predates it refuses a message
    that does use it (an unknown field), which is right: it could not honour it."""
    return f.default is None


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (_absent_ok(f) and getattr(value, f.name) is None)}
    if isinstance(value, (tuple, list)):
        return [_to_wire(v) for v in value]
    return value


def encode(msg: Message) -> bytes:
    """Encode a message into its envelope bytes."""
    if type(msg).KIND not in KINDS:
        raise SchemaError(f"{type(msg).__name__} is not a registered message kind")
    body = _to_wire(msg)
    return msgpack.packb({"v": PROTOCOL_VERSION, "k": type(msg).KIND, "b": body}, use_bin_type=True)


def _from_wire(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _from_wire(value, inner[0], where)
        raise SchemaError(f"{where}: unsupported union")  # pragma: no cover - schema bug
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise SchemaError(f"{where}: {value!r} not one of {typing.get_args(tp)}")
        return value
    if origin is tuple:
        (elem, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SchemaError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_from_wire(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (float, int)):
            raise SchemaError(f"{where}: expected float, got {type(value).__name__}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"{where}: expected int, got {type(value).__name__}")
        return value
    if tp in (str, bytes, bool):
        if type(value) is not tp:
            raise SchemaError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
        return value
    raise SchemaError(f"{where}: unsupported field type {tp}")  # pragma: no cover - schema bug


def _build(cls: Any, body: Any, where: str) -> Any:
    if not isinstance(body, dict):
        raise SchemaError(f"{where}: expected a map, got {type(body).__name__}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    extra = sorted(str(k) for k in set(body) - set(names))
    missing = [f.name for f in fields if f.name not in body and not _absent_ok(f)]
    if extra or missing:
        raise SchemaError(f"{where}: unknown field(s) {extra}, missing field(s) {missing}")
    kwargs = {n: _from_wire(body[n], hints[n], f"{where}.{n}") for n in names if n in body}
    try:
        return cls(**kwargs)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as e:
        raise SchemaError(f"{where}: {e}") from e


def decode(data: bytes, expect: type[Message] | None = None) -> Message:
    """Decode and validate envelope bytes. Raises VersionError, SchemaError or TruncatedError."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise SchemaError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        env = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except msgpack.ExtraData as e:
        raise SchemaError(f"trailing bytes after the message: {e}") from e
    except ValueError as e:
        # msgpack reports a short buffer as ValueError("Unpack failed: incomplete input").
        if "incomplete" in str(e) or not data:
            raise TruncatedError(f"payload ended early ({len(data)} bytes): {e}") from e
        raise SchemaError(f"not a msgpack envelope: {e}") from e
    except Exception as e:  # msgpack raises a variety of types on garbage; all mean "not ours".
        raise SchemaError(f"not a msgpack envelope: {type(e).__name__}: {e}") from e
    if not isinstance(env, dict) or set(env) != {"v", "k", "b"}:
        raise SchemaError("envelope must be a map with exactly the keys v, k, b")
    if env["v"] != PROTOCOL_VERSION:
        raise VersionError(f"protocol version {env['v']!r}; this build speaks {PROTOCOL_VERSION}")
    kind = env["k"]
    if not isinstance(kind, str) or kind not in KINDS:
        raise SchemaError(f"unknown message kind {kind!r}")
    cls = KINDS[kind]
    if expect is not None and cls is not expect:
        raise SchemaError(f"expected a {expect.KIND!r} message, got {kind!r}")
    msg: Message = _build(cls, env["b"], cls.__name__)
    return msg
