"""Property-based fuzzing of everything that decodes bytes from the wire (slow suite).

Each test runs 10,000+ generated and mutated inputs: only typed ProtocolErrors may come out,
nothing crashes, and the receiver's state does not change.
"""

from __future__ import annotations

import copy
import logging

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import chunking, secagg, secure, sparse, tensors, topics
from shared import messages as M
from tests.specs import dense_spec
from shared.crypto import generate_keys
from shared.errors import ProtocolError

pytestmark = pytest.mark.slow
FUZZ = settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))

AGG, DEV = generate_keys(), generate_keys()
UPDATE = M.Update(round=2, device_id="dev-a", seq=1, num_examples=3, steps=1, train_loss=0.5, payload="delta",
                  base_digest="ab" * 32, tensors=tensors.pack({"w": np.ones(4, np.float32)}))
SEEDS = [
    M.encode(UPDATE),
    secure.seal_message(UPDATE, round=2, device_id="dev-a", sender=DEV, recipient=AGG.public),
    secure.sign_message(M.DeviceStatus(device_id="dev-a", state="online", profile="cpu-dev", num_examples=3, detail=""),
                        round=0, device_id="dev-a", key=DEV),
    chunking.Manifest(xfer_id="0" * 32, total_size=10, chunk_size=4, count=3, sha256=bytes(32), chunk_sha256=None).encode(),
    chunking.Chunk(xfer_id="0" * 32, seq=0, data=b"abcd").encode(),
    secure.seal_message(M.MaskedUpdate(round=2, device_id="dev-a", seq=1, num_examples=3, steps=1, train_loss=0.5,
                                       base_digest="ab" * 32, masked=bytes(16)),
                        round=2, device_id="dev-a", sender=DEV, recipient=AGG.public),
    secure.seal_message(M.SecAggMsg(round=2, device_id="dev-a", body=secagg.encode(
        secagg.AdvertiseKeys(round_id=2, sender=0, c_pk=bytes(32), s_pk=bytes(range(32))))),
                        round=2, device_id="dev-a", sender=DEV, recipient=AGG.public),
    secagg.encode(secagg.AdvertiseKeys(round_id=2, sender=0, c_pk=bytes(32), s_pk=bytes(range(32)))),
    sparse.encode_indices(np.array([1, 5, 9], np.uint32), 16),
    sparse.topk_encode(np.arange(16, dtype=np.float32), 3, "float16"),
]
# The hardened round's message kinds (issue 9), each a seed of its own for the mutators.
_H = secagg.hardened
HARDENED = [
    _H.SignedAdvertise(round_id=2, sender=0, c_pk=bytes(32), s_pk=bytes(range(32)), commit=b"m" * 32, cert=b"c" * 150,
                       sig=b"s" * 145),
    _H.AdvertList(round_id=2, recipient=0, entries=(secagg.messages.ListEntry(0, bytes(32), b"m" * 32),
                                                     secagg.messages.ListEntry(1, bytes(range(32)), b"n" * 32))),
    _H.SeedReveal(round_id=2, sender=1, rho=bytes(range(32))),
    _H.SignedKeys(round_id=2, recipient=0, rhos=((0, bytes(32)), (1, bytes(range(32)))),
                  keys=(secagg.messages.SignedEntry(1, bytes(32), bytes(32), b"m" * 32, b"c" * 150, b"s" * 145),)),
    _H.ConsistencyRequest(round_id=2, recipient=0, survivors=(0, 1, 2), list_hash=bytes(32)),
    _H.ConsistencySig(round_id=2, sender=1, sig=b"s" * 145),
    _H.SignedUnmaskRequest(round_id=2, recipient=0, survivors=(0, 1), dropped=(2,), sigs=((1, b"s" * 145),),
                           signers=(secagg.messages.SignedEntry(1, bytes(32), bytes(32), b"m" * 32, b"c" * 150, b"s" * 145),)),
    secagg.BundleReceipt(round_id=2, sender=1, rejected=(0, 3)),
    secagg.MaskPeers(round_id=2, recipient=1, peers=(0, 2, 4)),
]
SEEDS += [secagg.encode(m) for m in HARDENED]
SEEDS += [secure.seal_message(M.SecAggMsg(round=2, device_id="dev-a", body=secagg.encode(m)), round=2, device_id="dev-a",
                              sender=DEV, recipient=AGG.public) for m in HARDENED[::2]]

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[i : i + draw(st.integers(1, 8))]
    return bytes(data)


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    """Envelopes that look right at the top and are wrong inside."""
    env = msgpack.unpackb(draw(st.sampled_from(SEEDS[:3])), raw=False)
    body = env["b"]
    key = draw(st.sampled_from(sorted(body) + ["extra"]))
    body[key] = draw(msgpack_values)
    if draw(st.booleans()):
        env["v"] = draw(msgpack_values)
    return msgpack.packb(env, use_bin_type=True)


wire_inputs = st.one_of(st.binary(max_size=300), mutated(), structured(), msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)))


def _edits(seed: bytes) -> st.SearchStrategy[bytes]:
    return st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)), min_size=1, max_size=4).map(
        lambda edits: bytes(b if i not in dict(edits) else dict(edits)[i] for i, b in enumerate(seed)))


# 10,000 inputs for each of the hardened kinds: byte edits of a valid message, cuts and
# extensions of it, and random bytes behind its valid header.
@pytest.mark.parametrize("msg", HARDENED, ids=lambda m: type(m).__name__)
def test_fuzz_hardened_secagg_messages_raise_only_typed_errors(msg: object) -> None:
    seed = secagg.encode(msg)  # type: ignore[arg-type]

    @FUZZ
    @given(_edits(seed) | st.integers(0, len(seed)).map(lambda n: seed[:n])
           | st.binary(min_size=1, max_size=64).map(lambda tail: seed + tail)
           | st.binary(max_size=300).map(lambda body: seed[:16] + body))
    def check(data: bytes) -> None:
        try:
            m = secagg.decode(data)
        except ProtocolError:
            return
        assert secagg.decode(secagg.encode(m)) == m  # whatever decodes, round-trips

    check()


@FUZZ
@given(wire_inputs)
def test_fuzz_message_and_frame_decoders_raise_only_typed_errors(data: bytes) -> None:
    for decode in (M.decode, chunking.decode_frame, secure.peek, secagg.decode, lambda b: sparse.decode_indices(b, 16),
                   lambda b: sparse.topk_decode(b, 16), lambda b: sparse.unpack_ring(b, 12, 8)):
        try:
            decode(data)
        except ProtocolError:
            pass


@pytest.fixture(scope="module")
def aggregator(tmp_path_factory: pytest.TempPathFactory):
    from aggregator import registry
    from aggregator.config import AggregatorConfig
    from aggregator.server import Aggregator, RoundBook
    from shared.crypto import save_private_keys, save_public_keys
    from shared.datasets import Example, write_jsonl

    d = tmp_path_factory.mktemp("agg")
    save_private_keys(AGG, d / "agg.key")
    save_public_keys(generate_keys().public, d / "authority.pub.json")
    registry.enroll(d / "reg.json", "dev-a", DEV.public)
    write_jsonl(d / "eval.jsonl", [Example("Add.", "1 2", "3", "arith")])
    a = Aggregator(AggregatorConfig(broker="mqtt://127.0.0.1:1", student="unused", eval_data=str(d / "eval.jsonl"),
                                    out_dir=str(d / "out"), keys=str(d / "agg.key"), registry=str(d / "reg.json"), mode="fedit",
                                    authority=str(d / "authority.pub.json")))
    a.digest = "ab" * 32
    a.global_state = {"w": np.zeros(4, np.float32)}
    a.book = RoundBook(rnd=2, participants=["dev-a"], deadline=1e18, spec=dense_spec(2, ["dev-a"], 4))
    # The seeds are genuine traffic the aggregator has already seen, so a mutation that happens to
    # reproduce one is a replay: the status is already known and the update's seq already used.
    a.col.online = {"dev-a": 3}
    a.col.last_seq = {"dev-a": 1}
    # ... and the seeds' round-2 update was accepted in this round: a replay of it is refused
    # without effect. (Were seq 1 used in an earlier round, a replay would carry that round's
    # number and be refused by it; an authenticated update of the open round whose counter is
    # behind can only be the device's own after a reset, and that drops it: not a no-op.)
    from aggregator.strategy import Reply

    a.book.replies = {"dev-a": Reply("dev-a", 3, {})}
    logging.getLogger("aggregator.collect").setLevel(logging.CRITICAL)
    return a


def _snapshot(a) -> tuple:
    b = a.book
    return (dict(a.online), dict(a.col.last_seq), {k: v.copy() for k, v in a.global_state.items()},
            dict(b.replies), set(b.dropped), a.col.uploads.active_transfers)


@FUZZ
@given(st.sampled_from(["update", "status", "chunk", "secagg"]), wire_inputs)
def test_fuzz_aggregator_dispatch_changes_nothing(aggregator, kind: str, data: bytes) -> None:
    before = _snapshot(aggregator)
    aggregator.dispatch(topics.up("dev-a", kind), data, len(data))  # must not raise
    after = _snapshot(aggregator)
    assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3] and after[4] == before[4]
    for k in before[2]:
        np.testing.assert_array_equal(before[2][k], after[2][k])
    # a manifest that decodes may open a (bounded) transfer; that is state the reassembler owns
    for sender, xfer in list(aggregator.col.uploads._transfers):  # noqa: SLF001
        aggregator.col.uploads.drop(xfer, sender=sender)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory):
    from edge_client.client import EdgeClient
    from edge_client.config import EdgeConfig
    from shared.crypto import save_private_keys, save_public_keys
    from shared.datasets import Example, write_jsonl

    d = tmp_path_factory.mktemp("edge")
    save_private_keys(DEV, d / "dev.key")
    save_public_keys(AGG.public, d / "agg.pub.json")
    write_jsonl(d / "data.jsonl", [Example("Add.", "1 2", "3", "arith")])
    c = EdgeClient(EdgeConfig(device_id="dev-a", broker="mqtt://127.0.0.1:1", data=str(d / "data.jsonl"), student="unused",
                              work_dir=str(d / "w"), keys=str(d / "dev.key"), aggregator_keys=str(d / "agg.pub.json")))
    c._seen_round(1)
    logging.getLogger("edge_client.client").setLevel(logging.CRITICAL)
    return c


@FUZZ
@given(st.sampled_from([topics.down("dev-a", "round"), topics.down("dev-a", "chunk"), topics.down("dev-a", "secagg"),
                        topics.bcast("shutdown")]), wire_inputs)
def test_fuzz_edge_handle_changes_nothing(edge, topic: str, data: bytes) -> None:
    before = (edge.last_round, edge.seq, copy.copy(edge.examples), edge.sa_spec, edge.sa_state)
    keep_going = edge.handle(topic, data)  # must not raise; a forged shutdown cannot verify
    assert keep_going is True
    assert (edge.last_round, edge.seq, edge.examples, edge.sa_spec, edge.sa_state) == before
    for sender, xfer in list(edge.downloads._transfers):  # noqa: SLF001
        edge.downloads.drop(xfer, sender=sender)
