"""Golden bytes of every byte format besides the msgpack messages (those are in ``test_golden``).

Each case builds a fixed value from fixed keys (raw private-key bytes), fixed nonces (the
known-answer seams ``_hazmat.seal(ephemeral_secret=)`` and ``secagg._crypto.seal(nonce=)``) and
fixed clocks, encodes it with the production encoder, compares with the bytes written here, and
decodes those bytes back to the value. Ed25519 is deterministic, so real signatures, certificates
and signed adverts have fixed bytes too. If one fails, the format changed: bump that format's
version and add a case, rather than editing the bytes here.

The map of formats, their modules and their cases is in ``shared/__init__.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from shared import _hazmat, authority, crypto, ledger, release, secure, sparse
from shared import messages as M
from shared.canonical import canonical_json, canonical_json_cert_v1
from shared.crypto import AssociatedData, DeviceKeys
from shared.secagg import _crypto as sa_crypto
from shared.secagg import hardened, prg, shamir
from shared.secagg import messages as SA
from shared.secagg.protocol import _BUNDLE

# Fixed keys: never use such keys for anything else.
AUTH = DeviceKeys(signing_seed=bytes(range(128, 160)), encryption_secret=bytes(range(160, 192)))
DEV1 = DeviceKeys(signing_seed=bytes(range(32)), encryption_secret=bytes(range(32, 64)))
DEV2 = DeviceKeys(signing_seed=bytes(range(64, 96)), encryption_secret=bytes(range(96, 128)))
AGG = DeviceKeys(signing_seed=bytes(range(192, 224)), encryption_secret=bytes(range(224, 256)))
DEVICE_OF = {1: "dev-1", 2: "dev-2"}
ROUND = 3
NOT_BEFORE = 1_700_000_000  # certificates valid from 2023-11-14 ...
CERT_DAYS = 36_500  # ... for a century, so the golden ones verify on any test machine's clock
# Per-round X25519 secrets of the secure-aggregation nodes (c: share encryption, s: masks).
C_SK = {1: bytes([0x11]) * 32, 2: bytes([0x22]) * 32}
S_SK = {1: bytes([0x33]) * 32, 2: bytes([0x44]) * 32}
RHO = {1: bytes([0x55]) * 32, 2: bytes([0x66]) * 32}
B_SEED = bytes([0x77]) * 32
COEFF = 0x1234567890ABCDEF  # the degree-1 coefficient of the (threshold-2) sharing polynomials
SPEC_SEED = bytes(range(32))  # the round spec's graph seed
NONCE = bytes(range(12))  # ChaCha20-Poly1305 nonce of the share bundle
EPHEMERAL = bytes([0x42]) * 32  # X25519 ephemeral of the sealed envelope
FIXED_TIME = 1_750_000_000.0


def _pk(sk: bytes) -> bytes:
    return sa_crypto.public_from_private(sk)


def _share(secret: bytes, node: int) -> bytes:
    x = node + 1  # protocol._x
    return shamir.Share(x, (int.from_bytes(secret, "big") + COEFF * x) % shamir.PRIME).to_bytes()


def _cert(node: int, keys: DeviceKeys) -> bytes:
    return authority.certify(DEVICE_OF[node], keys.public, AUTH, days=CERT_DAYS, not_before=NOT_BEFORE).blob


def _signed_advert(node: int, keys: DeviceKeys) -> SA.SignedAdvertise:
    commit = hardened.commitment(ROUND, node, RHO[node])
    c_pk, s_pk = _pk(C_SK[node]), _pk(S_SK[node])
    sig = crypto.sign(hardened._advert_payload(ROUND, node, c_pk, s_pk, commit), keys,  # noqa: SLF001
                      aad=AssociatedData(ROUND, DEVICE_OF[node], hardened.ADVERT_KIND))
    return SA.SignedAdvertise(ROUND, node, c_pk, s_pk, commit, _cert(node, keys), sig)


def _bundle_1_to_2(context: bytes) -> bytes:
    """Node 1's sealed share bundle for node 2, as ``protocol.client_share_keys`` builds it (bound
    to the hardened round's graph seed)."""
    key = sa_crypto.share_key(C_SK[1], _pk(C_SK[2]), ROUND)
    plain = _BUNDLE.pack(1, 2) + _share(B_SEED, 2) + _share(S_SK[1], 2)
    return sa_crypto.seal(key, ROUND, 1, 2, plain, context, nonce=NONCE)


def _graph_seed(lhash: bytes) -> bytes:
    return hardened.graph_seed(SPEC_SEED, ROUND, lhash, sorted(RHO.items()))


def _masked_1() -> bytes:
    """Node 1's input (5 values) plus its pairwise mask with node 2 and its own mask, mod 2^32."""
    x = np.array([1, 2, 3, 0x7FFFFFFF, 0xFFFFFFFF], dtype=np.uint32)
    y = x + prg.expand(sa_crypto.mask_seed(S_SK[1], _pk(S_SK[2]), ROUND), 5) + prg.expand(B_SEED, 5)
    return y.astype("<u4").tobytes()


def _consistency_sig(node: int, keys: DeviceKeys, lhash: bytes) -> bytes:
    return crypto.sign(hardened._consistency_payload(ROUND, lhash, (1, 2)), keys,  # noqa: SLF001
                       aad=AssociatedData(ROUND, DEVICE_OF[node], hardened.CONSISTENCY_KIND))


def secagg_samples() -> dict[str, SA.Message]:
    adv1, adv2 = _signed_advert(1, DEV1), _signed_advert(2, DEV2)
    entry2 = hardened._entry_of(adv2)  # noqa: SLF001
    listed = (SA.ListEntry(1, hardened.digest(adv1), adv1.commit), SA.ListEntry(2, hardened.digest(adv2), adv2.commit))
    lhash = hardened.list_hash(listed)
    keys = tuple(SA.KeyEntry(n, _pk(C_SK[n]), _pk(S_SK[n])) for n in (1, 2))
    bundle = _bundle_1_to_2(_graph_seed(lhash))
    sigs = ((1, _consistency_sig(1, DEV1, lhash)), (2, _consistency_sig(2, DEV2, lhash)))
    return {
        "advertise_keys": SA.AdvertiseKeys(ROUND, 1, keys[0].c_pk, keys[0].s_pk),
        "neighbour_keys": SA.NeighbourKeys(ROUND, 1, keys),
        "share_keys": SA.ShareKeys(ROUND, 1, (SA.Sealed(2, bundle),)),
        "forwarded_shares": SA.ForwardedShares(ROUND, 2, (SA.Sealed(1, bundle),)),
        "masked_input": SA.MaskedInput(ROUND, 1, _masked_1()),
        "unmask_request": SA.UnmaskRequest(ROUND, 2, (1, 2), (4,)),
        "unmask_shares": SA.UnmaskShares(ROUND, 2, (SA.OwnedShare(1, _share(B_SEED, 2)),),
                                         (SA.OwnedShare(4, _share(S_SK[1], 2)),)),
        "signed_advertise": adv1,
        "signed_keys": SA.SignedKeys(ROUND, 1, ((1, RHO[1]), (2, RHO[2])), (entry2,)),
        "consistency_request": SA.ConsistencyRequest(ROUND, 1, (1, 2), lhash),
        "consistency_sig": SA.ConsistencySig(ROUND, 1, sigs[0][1]),
        "signed_unmask_request": SA.SignedUnmaskRequest(ROUND, 1, (1, 2), (), sigs, (entry2,)),
        "bundle_receipt": SA.BundleReceipt(ROUND, 1, (2,)),
        "mask_peers": SA.MaskPeers(ROUND, 1, (2,)),
        "advert_list": SA.AdvertList(ROUND, 1, listed),
        "seed_reveal": SA.SeedReveal(ROUND, 1, RHO[1]),
    }


GOLDEN_SA: dict[str, str] = {
    "advertise_keys": (
        "534102010000000000000003000000017b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f137b0d"
        "47d93427f8311160781c7c733fd89f88970aef490d8aa0ee19a4cb8a1b14"
    ),
    "neighbour_keys": (
        "5341020200000000000000030000000100000002000000017b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74"
        "892cb0f73f137b0d47d93427f8311160781c7c733fd89f88970aef490d8aa0ee19a4cb8a1b14000000020faa684ed28867b9"
        "7f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20ff2ee45601ec1b67310c7790404585ae697331eee1c1f8cf2419"
        "731c1fff3e6b"
    ),
    "share_keys": (
        "5341020300000000000000030000000100000001000000020000006e000102030405060708090a0b40715f5b88ef7cbec013"
        "d5d94d826fcd4d2728380908930aa2b7d4b73b20ef56069cba25b82acfd063d888ff7c61096505adde1017a278c74902c914"
        "4b23c0f574caf35fa9755c9648e31996156bc73cd66bff819ff27519a75da88b2e439e9793c5"
    ),
    "forwarded_shares": (
        "5341020400000000000000030000000200000001000000010000006e000102030405060708090a0b40715f5b88ef7cbec013"
        "d5d94d826fcd4d2728380908930aa2b7d4b73b20ef56069cba25b82acfd063d888ff7c61096505adde1017a278c74902c914"
        "4b23c0f574caf35fa9755c9648e31996156bc73cd66bff819ff27519a75da88b2e439e9793c5"
    ),
    "masked_input": (
        "53410205000000000000000300000001000000052f7fe283a15f4bddec6d55c2b96b5dacd7622a6d"
    ),
    "unmask_request": (
        "534102060000000000000003000000020000000200000001000000020000000100000004"
    ),
    "unmask_shares": (
        "5341020700000000000000030000000200000001000000010000000300777777777777777777777777777777777777777777"
        "777777ae147ae1297ae1440000000100000004000000030033333333333333333333333333333333333333333333333369d0"
        "369ce5369d00"
    ),
    "signed_advertise": (
        "534102080000000000000003000000017b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f137b0d"
        "47d93427f8311160781c7c733fd89f88970aef490d8aa0ee19a4cb8a1b1420d7a5fafecf7ae89cbe7f6a63a207639c8ec112"
        "ce9f582bd71d2879cab0a6c600000107464c4d67017b226465766963655f6964223a20226465762d31222c2022656e637279"
        "7074696f6e223a20224e594279316a5a59674e4775366a4b61333545684f446852375347696a6a7431365758513073305759"
        "6c513d222c20226e6f745f6166746572223a20343835333630303030302c20226e6f745f6265666f7265223a203137303030"
        "30303030302c20227369676e696e67223a202241364548762f504f454c3464634e3059353076416d57666b316a4362705131"
        "66486479475a424a564d62673d227d6123ecf81a4efa495074f8b343181ff0a240368c2a85fa4cac8f44b9d73bceba6e3832"
        "22766264a35fba35eeb35693fe5da9ff54ed06b5b90453ee44842a4d01000000b4464c4d6701616476000000000000000300"
        "0000017b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f137b0d47d93427f8311160781c7c733f"
        "d89f88970aef490d8aa0ee19a4cb8a1b1420d7a5fafecf7ae89cbe7f6a63a207639c8ec112ce9f582bd71d2879cab0a6c6b2"
        "325b46595baed3955f4cdda51c0a5ed068cda6b027091b701969ebc9332760513a783dfe115c37324a662bd177573196fccd"
        "a77bbfdad542556c5c06e3b408"
    ),
    "signed_keys": (
        "5341020900000000000000030000000100000002000000015555555555555555555555555555555555555555555555555555"
        "5555555555550000000266666666666666666666666666666666666666666666666666666666666666660000000100000002"
        "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20ff2ee45601ec1b67310c7790404585ae6973"
        "31eee1c1f8cf2419731c1fff3e6bc7aa119b48a8e8151683342b81443d48d23fdf9e9c07097067fb05dfd44b80d700000107"
        "464c4d67017b226465766963655f6964223a20226465762d32222c2022656e6372797074696f6e223a20225a313356644f31"
        "336954454c5053353267664e3543305a73647a7356496637504e6c6435574463657053383d222c20226e6f745f6166746572"
        "223a20343835333630303030302c20226e6f745f6265666f7265223a20313730303030303030302c20227369676e696e6722"
        "3a20224a554f354c2f454a565246486174794461647474334a4d325a61455a654e326851453768426d7970565a303d227dc2"
        "6d9992ad10192a3418d86b0e777c4784bd0c6e4b722f6b6df5cccf64d7f181ac5c4fd408f13111e8c5b0181b3650d37d55ac"
        "508ee00f7f470bedaecd676408000000b4464c4d67016164760000000000000003000000020faa684ed28867b97f4a6a2dee"
        "5df8ce974e76b7018e3f22a1c4cf2678570f20ff2ee45601ec1b67310c7790404585ae697331eee1c1f8cf2419731c1fff3e"
        "6bc7aa119b48a8e8151683342b81443d48d23fdf9e9c07097067fb05dfd44b80d7dc157aa178e9fcddb1d2b88729a4e616b8"
        "a2b854f0c5e284b14145232fe8237a76e346cde62180e8a334b1d39203ef98e5bd292778d1b70d6144cb43460f580f"
    ),
    "consistency_request": (
        "5341020a00000000000000030000000100000002000000010000000221787df831e1f2ccef6c7467f37f693ee1e55782ba66"
        "0deb09e7b2aad07ba4af"
    ),
    "consistency_sig": (
        "5341020b00000000000000030000000100000090464c4d6701636f6e000000000000000321787df831e1f2ccef6c7467f37f"
        "693ee1e55782ba660deb09e7b2aad07ba4afcdc3e6c31d4bf20b8f66416be5c21bceb5a9185696111e39ea041539cb8930a4"
        "de0186d755738d8d89a3a7d9851958165b454f514b4219bdb1a2385fb7953f9305b1166551e30d8bd17304ed1f89a18a70b2"
        "19393bea24eadd5f56af6547370b"
    ),
    "signed_unmask_request": (
        "5341020c00000000000000030000000100000002000000010000000200000000000000020000000100000090464c4d670163"
        "6f6e000000000000000321787df831e1f2ccef6c7467f37f693ee1e55782ba660deb09e7b2aad07ba4afcdc3e6c31d4bf20b"
        "8f66416be5c21bceb5a9185696111e39ea041539cb8930a4de0186d755738d8d89a3a7d9851958165b454f514b4219bdb1a2"
        "385fb7953f9305b1166551e30d8bd17304ed1f89a18a70b219393bea24eadd5f56af6547370b0000000200000090464c4d67"
        "01636f6e000000000000000321787df831e1f2ccef6c7467f37f693ee1e55782ba660deb09e7b2aad07ba4afcdc3e6c31d4b"
        "f20b8f66416be5c21bceb5a9185696111e39ea041539cb8930a414f504ff48e7ac7d6d800a72e0200b0346a12c1f3f0ac37a"
        "5f9fd01fb98a967d73b7f3bb7ed3f9399466e4d37d6dd93a9ea751ffcd9d4be3dc84d751e640270a00000001000000020faa"
        "684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20ff2ee45601ec1b67310c7790404585ae697331ee"
        "e1c1f8cf2419731c1fff3e6bc7aa119b48a8e8151683342b81443d48d23fdf9e9c07097067fb05dfd44b80d700000107464c"
        "4d67017b226465766963655f6964223a20226465762d32222c2022656e6372797074696f6e223a20225a313356644f313369"
        "54454c5053353267664e3543305a73647a7356496637504e6c6435574463657053383d222c20226e6f745f6166746572223a"
        "20343835333630303030302c20226e6f745f6265666f7265223a20313730303030303030302c20227369676e696e67223a20"
        "224a554f354c2f454a565246486174794461647474334a4d325a61455a654e326851453768426d7970565a303d227dc26d99"
        "92ad10192a3418d86b0e777c4784bd0c6e4b722f6b6df5cccf64d7f181ac5c4fd408f13111e8c5b0181b3650d37d55ac508e"
        "e00f7f470bedaecd676408000000b4464c4d67016164760000000000000003000000020faa684ed28867b97f4a6a2dee5df8"
        "ce974e76b7018e3f22a1c4cf2678570f20ff2ee45601ec1b67310c7790404585ae697331eee1c1f8cf2419731c1fff3e6bc7"
        "aa119b48a8e8151683342b81443d48d23fdf9e9c07097067fb05dfd44b80d7dc157aa178e9fcddb1d2b88729a4e616b8a2b8"
        "54f0c5e284b14145232fe8237a76e346cde62180e8a334b1d39203ef98e5bd292778d1b70d6144cb43460f580f"
    ),
    "bundle_receipt": (
        "5341020d0000000000000003000000010000000100000002"
    ),
    "mask_peers": (
        "5341020e0000000000000003000000010000000100000002"
    ),
    "advert_list": (
        "5341020f0000000000000003000000010000000200000001fa1827c04849a7c351536cfd22ac1b5e587b4f7d850f3e4d4202"
        "a883d17366b720d7a5fafecf7ae89cbe7f6a63a207639c8ec112ce9f582bd71d2879cab0a6c600000002457ca60814616df8"
        "ee54b448746b62fb3ee2bc1a5bb4dcd36cadbcebbf1b2315c7aa119b48a8e8151683342b81443d48d23fdf9e9c07097067fb"
        "05dfd44b80d7"
    ),
    "seed_reveal": (
        "534102100000000000000003000000015555555555555555555555555555555555555555555555555555555555555555"
    ),
}


def _hex(s: str) -> bytes:
    return bytes.fromhex("".join(s.split()))


# --------------------------------------------------------------------------- the "SA" struct

def test_every_secagg_kind_has_golden_bytes() -> None:
    kinds = {type(m) for m in secagg_samples().values()}
    assert kinds == set(SA._KINDS), "add a golden case for the new secagg message kind"  # noqa: SLF001
    assert set(GOLDEN_SA) == set(secagg_samples())


@pytest.mark.parametrize("name", sorted(GOLDEN_SA))
def test_secagg_golden_bytes(name: str) -> None:
    msg = secagg_samples()[name]
    golden = _hex(GOLDEN_SA[name])
    assert SA.encode(msg).hex() == golden.hex(), f"{name}: the SA encoding changed (bump secagg VERSION)"
    assert SA.decode(golden) == msg


def test_secagg_golden_bodies_are_real() -> None:
    """The golden bodies are what the protocol accepts, not filler: the signed advert verifies
    under the authority, the bundle opens and its shares reconstruct, the signatures verify."""
    samples = {k: SA.decode(_hex(v)) for k, v in GOLDEN_SA.items()}
    ident = hardened.Identity(DEVICE_OF, AUTH.public)
    adv = samples["signed_advertise"]
    assert isinstance(adv, SA.SignedAdvertise)
    assert hardened.check_advert(ident, ROUND, adv, 1) == DEV1.public
    keys = samples["signed_keys"]
    assert isinstance(keys, SA.SignedKeys)
    assert hardened.check_advert(ident, ROUND, keys.keys[0], 2) == DEV2.public
    listed = samples["advert_list"]
    assert isinstance(listed, SA.AdvertList)
    lhash = hardened.list_hash(listed.entries)
    fwd = samples["forwarded_shares"]
    assert isinstance(fwd, SA.ForwardedShares)
    plain = sa_crypto.open_sealed(sa_crypto.share_key(C_SK[2], _pk(C_SK[1]), ROUND), ROUND, 1, 2, fwd.sealed[0].blob,
                                  _graph_seed(lhash))
    assert _BUNDLE.unpack(plain[:8]) == (1, 2)
    b_share = shamir.Share.from_bytes(plain[8:8 + shamir.SHARE_BYTES])
    other = shamir.Share.from_bytes(_share(B_SEED, 1))
    assert shamir.reconstruct([b_share, other], 2) == B_SEED
    sig = samples["consistency_sig"]
    assert isinstance(sig, SA.ConsistencySig)
    assert crypto.verify(sig.sig, DEV1.public, aad=AssociatedData(ROUND, "dev-1", hardened.CONSISTENCY_KIND)) == \
        hardened._consistency_payload(ROUND, lhash, (1, 2))  # noqa: SLF001


# ---------------------------------------------------------------------------- the "TK" struct

TK_VEC = np.zeros(300, dtype=np.float32)
TK_VEC[[2, 130, 299, 7]] = [0.5, -3.25, 2.0, 0.125]
GOLDEN_TK: dict[str, str] = {
    "float16": "544b012c0100000300000002027fa801003880c20040",
    "float32": "544b012c0100000300000001027fa8010000003f000050c000000040",
}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_topk_golden_bytes(dtype: str) -> None:
    golden = _hex(GOLDEN_TK[dtype])
    assert sparse.topk_encode(TK_VEC, 3, value_dtype=dtype).hex() == golden.hex()
    idx, values = sparse.topk_decode(golden, 300)
    assert idx.tolist() == [2, 130, 299] and values.tolist() == [0.5, -3.25, 2.0]


# ------------------------------------------------------------------------- tagged index sets

GOLDEN_INDICES: list[tuple[list[int], int, str]] = [
    ([0, 2, 9], 10, "010502"),
    ([472, 511, 26445], 1000000, "0203d80326cdca01"),
    ([], 0, "01"),
    ([], 5, "0200"),
    ([127, 128, 16511], 4294967295, "02037f00fe7f"),
    ([0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45, 48, 51, 54, 57, 60, 63], 64, "014992244992244992"),
]


@pytest.mark.parametrize(("idx", "dim", "golden"), GOLDEN_INDICES)
def test_index_set_golden_bytes(idx: list[int], dim: int, golden: str) -> None:
    assert sparse.encode_indices(np.array(idx, dtype=np.int64), dim).hex() == golden
    assert sparse.decode_indices(bytes.fromhex(golden), dim).tolist() == idx


# ------------------------------------------------------------------------------ ring packing

RING_Y = np.array([0, 1, 0xFFFFFFFF, 0x12345678, 31, 0xABCDEF, 6, 0x80000000, 9], dtype=np.uint32)
GOLDEN_RING: dict[int, str] = {
    1: "3601",
    5: "207cfc9f0109",
    8: "0001ff781fef060009",
    12: "001000ff8f671ff0de0600000900",
    16: "00000100ffff78561f00efcd060000000900",
    20: "0000100000ffff8f67451f00f0debc0600000000090000",
    31: "00000080000000c0ffffff1fcf8a46f2010000786f5e05180000000000000009000000",
    32: "0000000001000000ffffffff785634121f000000efcdab00060000000000008009000000",
}


@pytest.mark.parametrize("bits", sorted(GOLDEN_RING))
def test_ring_golden_bytes(bits: int) -> None:
    assert sparse.pack_ring(RING_Y, bits).hex() == GOLDEN_RING[bits]
    want = (RING_Y.astype(np.uint64) & ((1 << bits) - 1)).tolist()
    assert sparse.unpack_ring(bytes.fromhex(GOLDEN_RING[bits]), bits, RING_Y.size).tolist() == want


# ---------------------------------------------------------- crypto blobs: sealed and signed envelopes
# The bare ``seal`` / ``sign`` blobs and the associated-data layout have known-answer vectors in
# ``test_crypto``; these pin the envelopes ``shared.secure`` wraps them in.

STATUS = M.DeviceStatus(device_id="dev-1", state="training", profile="orin-nano-8gb", num_examples=42, detail="round 3")
GOLDEN_SIGNED_ENVELOPE = (
    "83a17601a16ba67369676e6564a16284a5726f756e6403a96465766963655f6964a56465762d31a46b696e64a67374617475"
    "73a4626c6f62c4a7464c4d670183a17601a16ba6737461747573a16285a96465766963655f6964a56465762d31a573746174"
    "65a8747261696e696e67a770726f66696c65ad6f72696e2d6e616e6f2d386762ac6e756d5f6578616d706c65732aa6646574"
    "61696ca7726f756e64203339c4be1c231055b8ced01a94e44ba72881fe25fec547f0a32564683644aa94440b7d44c2b03bbb"
    "6c609c50d6d9d60a95a61eec07da685d44502e13289a111b0d"
)
GOLDEN_SEALED_ENVELOPE = (
    "83a17601a16ba67365616c6564a16284a5726f756e6403a96465766963655f6964a56465762d31a46b696e64a87368757464"
    "6f776ea4626c6f62c494464c4d730101132c442be010fbd57e72603328aa76e71fccc1503aae219327d14d9c9993f472425f"
    "4a78e705d7d27e9d0c707e31ce953f47d880de56494d5ba61d3ad1f73f1a3a998ca22b5819fc2c1f3017640d8164c9d459c6"
    "b2918c910c3fe0843dfc6d54d68d87eae4d2276a0d423913a8889358804bffd460bddcc6ff6c37e7d27688ff127520f3b114"
    "5ac6890018352f04"
)


def test_signed_envelope_golden_bytes() -> None:
    golden = _hex(GOLDEN_SIGNED_ENVELOPE)
    assert secure.sign_message(STATUS, round=ROUND, device_id="dev-1", key=DEV1).hex() == golden.hex()
    got = secure.open_message(golden, M.DeviceStatus, device_id="dev-1", check_round=lambda r: None, recipient=None,
                              sender=DEV1.public, sealed=False)
    assert got == STATUS


def _fixed_seal(plaintext: bytes, *, recipient: crypto.PublicKeys, sender: DeviceKeys, aad: AssociatedData) -> bytes:
    return _hazmat.seal(plaintext, recipient_enc_pub=recipient.encryption, sender_signing_seed=sender.signing_seed,
                        aad=aad.encode(), ephemeral_secret=EPHEMERAL)


def test_sealed_envelope_golden_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    golden = _hex(GOLDEN_SEALED_ENVELOPE)
    monkeypatch.setattr(secure, "seal", _fixed_seal)  # the envelope's only random part: its ephemeral key
    msg = M.Shutdown(reason="done")
    assert secure.seal_message(msg, round=ROUND, device_id="dev-1", sender=DEV1, recipient=AGG.public).hex() == golden.hex()
    monkeypatch.undo()
    got = secure.open_message(golden, M.Shutdown, device_id="dev-1", check_round=lambda r: None, recipient=AGG,
                              sender=DEV1.public, sealed=True)
    assert got == msg


# ------------------------------------------------------------------------- canonical JSON

# Every kind of value the signed producers put in: nested maps and lists, ints, floats (one that
# prints with an exponent), bools, null, non-ASCII and control characters, keys needing sorting.
CANONICAL_CASES: list[object] = [
    {"b": [1, 2.5, None, True, False], "a": "\u00e9\u2713\n\"q\"", "c": {"z": 1, "y": -0.0, "x": []}, "d": 1e-7},
    {"entry": {"seq": 0, "detail": {"version": 1}}, "signed": "AAAA+/=="},
    {"round": 2**40, "mode": "fl-minillm", "parity": {"max_abs": 0.0009765625, "ok": True}, "files": [{"n": 1}]},
    [], {}, "plain", 0,
]
GOLDEN_CANONICAL = (b'{"a":"\\u00e9\\u2713\\n\\"q\\"","b":[1,2.5,null,true,false],"c":{"x":[],"y":-0.0,"z":1},'
                    b'"d":1e-07}')
GOLDEN_CANONICAL_CERT_V1 = (b'{"a": "\\u00e9\\u2713\\n\\"q\\"", "b": [1, 2.5, null, true, false], '
                            b'"c": {"x": [], "y": -0.0, "z": 1}, "d": 1e-07}')


def test_canonical_json_golden_bytes() -> None:
    assert canonical_json(CANONICAL_CASES[0]) == GOLDEN_CANONICAL
    assert canonical_json_cert_v1(CANONICAL_CASES[0]) == GOLDEN_CANONICAL_CERT_V1
    assert json.loads(GOLDEN_CANONICAL) == json.loads(GOLDEN_CANONICAL_CERT_V1) == CANONICAL_CASES[0]


@pytest.mark.parametrize("obj", CANONICAL_CASES)
def test_canonical_json_is_byte_identical_to_what_each_producer_signed_before(obj: object) -> None:
    """Manifests and ledgers signed before ``shared.canonical`` existed still verify: the one
    function gives exactly the bytes of the calls it replaced (release.py, ledger.py), and the
    certificate variant those of authority.py's."""
    assert canonical_json(obj) == json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()  # release
    assert canonical_json(obj) == json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()  # ledger
    assert canonical_json_cert_v1(obj) == json.dumps(obj, sort_keys=True).encode()  # authority


MANIFEST = release.ReleaseManifest(
    release_id="r3", fleet="fleet-a", round=3, mode="fl-minillm", base_model="tiny-llama-\u00e9",
    tokenizer_sha256="ab" * 32, quantization="int8",
    files=(release.FileEntry("config.json", 2, "00" * 32), release.FileEntry("model.onnx", 6, "ff" * 32)),
    parity={"max_abs": 0.001, "ok": True})
GOLDEN_MANIFEST = (
    b'{"base_model":"tiny-llama-\\u00e9","files":[{"name":"config.json",'
    b'"sha256":"0000000000000000000000000000000000000000000000000000000000000000","size":2},'
    b'{"name":"model.onnx","sha256":"ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",'
    b'"size":6}],"fleet":"fleet-a","mode":"fl-minillm","parity":{"max_abs":0.001,"ok":true},'
    b'"quantization":"int8","release_id":"r3","rollback_of":"","round":3,'
    b'"tokenizer_sha256":"abababababababababababababababababababababababababababababababab"}'
)
# A signed blob is magic, version, payload, then this Ed25519 signature (``shared._hazmat``).
GOLDEN_MANIFEST_SIG = (
    "0ad2c9f13553d20c4098df468fee82fb305e10e8771d43ae683c90d1c153609c8f543bcf328f92eb65f00bb39e7659fd60cb"
    "0c32fce2de020c5999322fc2ed08"
)


def test_release_manifest_golden_bytes() -> None:
    assert MANIFEST.encode() == GOLDEN_MANIFEST
    assert release.ReleaseManifest.decode(GOLDEN_MANIFEST) == MANIFEST
    signed = b"FLMg\x01" + GOLDEN_MANIFEST + _hex(GOLDEN_MANIFEST_SIG)
    assert release.sign(MANIFEST, AGG).hex() == signed.hex()
    assert release.verify(signed, AGG.public, "fleet-a") == MANIFEST


GOLDEN_CERT_PAYLOAD = (
    b'{"device_id": "dev-1", "encryption": "NYBy1jZYgNGu6jKa35EhODhR7SGijjt16WXQ0s0WYlQ=",'
    b' "not_after": 4853600000, "not_before": 1700000000,'
    b' "signing": "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="}'
)
GOLDEN_CERT_SIG = (
    "6123ecf81a4efa495074f8b343181ff0a240368c2a85fa4cac8f44b9d73bceba6e383222766264a35fba35eeb35693fe5da9"
    "ff54ed06b5b90453ee44842a4d01"
)


def test_device_certificate_golden_bytes() -> None:
    cert = authority.certify("dev-1", DEV1.public, AUTH, days=CERT_DAYS, not_before=NOT_BEFORE)
    assert crypto.signed_payload(cert.blob) == GOLDEN_CERT_PAYLOAD
    golden = b"FLMg\x01" + GOLDEN_CERT_PAYLOAD + _hex(GOLDEN_CERT_SIG)
    assert cert.blob.hex() == golden.hex()
    parsed = authority.Certificate.from_blob("dev-1", golden)
    assert parsed == cert
    assert authority.verify(parsed, AUTH.public, "dev-1", now=FIXED_TIME) == DEV1.public


GOLDEN_LEDGER = (
    b'{"entry":{"at":1750000000.0,"bytes":0,"detail":{"key":"e7d02b27cc01f6b1ec9b8b822f43fca4",'
    b'"version":1},"device":"dev-1","kind":"genesis",'
    b'"prev":"0000000000000000000000000000000000000000000000000000000000000000","round":0,"seq":0,'
    b'"sha256":""},'
    b'"signed":"RkxNZwF7ImF0IjoxNzUwMDAwMDAwLjAsImJ5dGVzIjowLCJkZXRhaWwiOnsia2V5IjoiZTdkMDJiMjdjYzAxZjZiMW'
    b'VjOWI4YjgyMmY0M2ZjYTQiLCJ2ZXJzaW9uIjoxfSwiZGV2aWNlIjoiZGV2LTEiLCJraW5kIjoiZ2VuZXNpcyIsInByZXYiOiIwMD'
    b'AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwIiwicm91bmQiOjAsIn'
    b'NlcSI6MCwic2hhMjU2IjoiIn3y9dlMHAfHO/i7ld7Cqu7v5MQdFFuiLJSFkUEIyE7WzlEIUdPdpkBm8/7ZBKfBaKS9rDFvgyMOMI'
    b'ZJkAeUj4QD"}\n{"entry":{"at":1750000000.0,"bytes":225,"detail":{"detail":"round 3",'
    b'"device_id":"dev-1","num_examples":42,"profile":"orin-nano-8gb","state":"training"},'
    b'"device":"dev-1","kind":"status",'
    b'"prev":"9e1b8f62e7346839efa6582261866a383d0fef41a35c81b7409fadcb935db5b6","round":3,"seq":1,'
    b'"sha256":"4a63aadb1d5cebb04dbbfed220fe0d44d2d6ac9ff8ccd9f1e54b033f9f25cff7"},'
    b'"signed":"RkxNZwF7ImF0IjoxNzUwMDAwMDAwLjAsImJ5dGVzIjoyMjUsImRldGFpbCI6eyJkZXRhaWwiOiJyb3VuZCAzIiwiZG'
    b'V2aWNlX2lkIjoiZGV2LTEiLCJudW1fZXhhbXBsZXMiOjQyLCJwcm9maWxlIjoib3Jpbi1uYW5vLThnYiIsInN0YXRlIjoidHJhaW'
    b'5pbmcifSwiZGV2aWNlIjoiZGV2LTEiLCJraW5kIjoic3RhdHVzIiwicHJldiI6IjllMWI4ZjYyZTczNDY4MzllZmE2NTgyMjYxOD'
    b'Y2YTM4M2QwZmVmNDFhMzVjODFiNzQwOWZhZGNiOTM1ZGI1YjYiLCJyb3VuZCI6Mywic2VxIjoxLCJzaGEyNTYiOiI0YTYzYWFkYj'
    b'FkNWNlYmIwNGRiYmZlZDIyMGZlMGQ0NGQyZDZhYzlmZjhjY2Q5ZjFlNTRiMDMzZjlmMjVjZmY3In0iGkpOYopbcANv3UMprEZpfm'
    b'fXPYYHcm042h6Y+lwkanQxufvIYbpCCzCVk/lj6kCPyQTmYME0O0tYplg4QkMJ"}\n'
)


def test_ledger_golden_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger.time, "time", lambda: FIXED_TIME)
    path = tmp_path / "ledger.jsonl"
    led = ledger.Ledger(path, "dev-1", DEV1)
    wire = secure.sign_message(STATUS, round=ROUND, device_id="dev-1", key=DEV1)
    led.record("status", ROUND, wire, STATUS)
    monkeypatch.undo()
    assert path.read_bytes() == GOLDEN_LEDGER
    path.write_bytes(GOLDEN_LEDGER)
    head = ledger.verify(path, DEV1.public)
    assert (head.device, head.seq) == ("dev-1", 1)
    assert head.hash == hashlib.sha256(GOLDEN_LEDGER.splitlines()[-1]).hexdigest()


def test_struct_sizes_match_the_documented_headers() -> None:
    # The layouts the module docstrings describe, so a reader can decode the hex above by hand.
    assert SA._HEADER.size == 16 and sparse._TOPK_HEADER.size == 12  # noqa: SLF001
