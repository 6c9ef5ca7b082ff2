"""Distributed DP in the ring (shared.dp) and its accounting (shared.dp_account).

The noise tests run the real device encoding (clip, rotate, scale, conditional rounding, Skellam
noise, two's complement into the ring), real pairwise masks from the SecAgg PRG added mod 2^32,
the ring's bit packing, the reduction into the spec's ring, and the aggregator's decoding; only
the key agreement that derives the mask seeds is left out.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from shared import dp, dp_account, sparse, update_codec
from shared import messages as M
from shared.errors import ConfigError, SchemaError
from shared.secagg import prg

DIM = 50  # coordinates of one contribution (the rotation pads them to 64)


def _spec(scale: float, z: float = 1.0, quorum: int = 3, c: float = 1.0, seed: bytes = bytes(range(32))) -> dp.DPSpec:
    return dp.DPSpec(mechanism="skellam", l2_clip=c, noise_multiplier=z, quorum=quorum, scale=scale, rotation_seed=seed)


def _inputs(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    # Norms around 2: most are clipped down to the L2 clip of 1.
    return [rng.normal(0, 2 / math.sqrt(DIM), DIM) for _ in range(n)]


def _secure_sum(xs: list[np.ndarray], spec: dp.DPSpec, ring_bits: int, rng: np.random.Generator) -> np.ndarray:
    """What the aggregator decodes from the survivors' masked inputs."""
    d = dp.ring_dim(DIM)
    enc = [dp.encode(x, spec, ring_bits, rng)[0] for x in xs]
    masked = []
    for u, x in enumerate(enc):
        y = x.copy()
        for v in range(len(enc)):
            if v != u:  # pairwise masks, + for the lower node, - for the higher: they cancel in the sum
                prg.add_mask(y, bytes([min(u, v), max(u, v)]) * 16, 1 if u < v else -1)
        # On the wire: the low ring_bits of each masked value, bit-packed.
        masked.append(sparse.unpack_ring(sparse.pack_ring(y, ring_bits), ring_bits, d))
    total = np.zeros(d, dtype=np.uint32)
    for y in masked:
        np.add(total, y, out=total, casting="unsafe")  # mod 2^32, as the aggregator's accumulator
    return dp.decode_sum(update_codec.reduce_ring(total, ring_bits), spec, ring_bits, DIM)


# -- the stages --------------------------------------------------------------------------------

def test_rotation_is_orthogonal_seeded_and_inverted() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=DIM)
    y = dp.rotate(x, bytes(32))
    assert y.size == 64
    assert math.isclose(float(np.linalg.norm(y)), float(np.linalg.norm(x)), rel_tol=1e-12)
    np.testing.assert_allclose(dp.unrotate(y, bytes(32), DIM), x, atol=1e-12)
    assert not np.allclose(dp.rotate(x, bytes(31) + b"\x01"), y)  # another seed, another rotation
    np.testing.assert_array_equal(dp.rotation_signs(b"s" * 32, 1000), dp.rotation_signs(b"s" * 32, 1000))
    # A spike is spread flat: what keeps rounding and wrap-around small.
    spike = np.zeros(DIM)
    spike[7] = 1.0
    np.testing.assert_allclose(np.abs(dp.rotate(spike, bytes(32))), 1 / 8)


@pytest.mark.parametrize(("n", "d"), [(1, 1), (2, 2), (3, 4), (64, 64), (65, 128), (4096, 4096)])
def test_a_small_contribution_rotates_as_one_block(n: int, d: int) -> None:
    assert dp.layout(n) == (d, d) and dp.ring_dim(n) == d


@pytest.mark.parametrize(("n", "layout"), [(8322, (9216, 1024)), (5000, (5120, 1024)), (1 << 20, (1 << 20, 1 << 20)),
                                           (1_000_003, (1 << 20, 1 << 20)), (600_000, (622_592, 32768))])
def test_a_large_contribution_rotates_in_blocks_and_pads_little(n: int, layout: tuple[int, int]) -> None:
    """Padding to the next power of two would double an 8,322-value upload: blocks pad by at most
    1/16 (or one minimum block)."""
    d, block = dp.layout(n)
    assert (d, block) == layout and d % block == 0 and d - n <= max(n // 16, dp.MIN_BLOCK)
    x = np.random.default_rng(0).normal(size=n)
    y = dp.rotate(x, b"r" * 32)
    assert y.size == d and math.isclose(float(np.linalg.norm(y)), float(np.linalg.norm(x)), rel_tol=1e-9)
    np.testing.assert_allclose(dp.unrotate(y, b"r" * 32, n), x, atol=1e-9)


def test_clip_l2_bounds_the_whole_vector() -> None:
    x = np.array([3.0, 4.0])
    y, f = dp.clip_l2(x, 1.0)
    assert math.isclose(float(np.linalg.norm(y)), 1.0) and f == pytest.approx(0.2)
    y, f = dp.clip_l2(x, 10.0)
    assert f == 1.0 and np.array_equal(y, x)


def test_conditional_rounding_is_unbiased_and_within_its_bound() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(0, 3, 256)
    bound = dp.rounded_l2_bound(float(np.linalg.norm(v)), v.size)
    draws = np.stack([dp.round_conditional(v, bound, rng) for _ in range(400)])
    assert np.linalg.norm(draws, axis=1).max() <= bound
    assert np.abs(draws.mean(0) - v).max() < 0.15  # 400 draws of errors within (-1, 1)


def test_skellam_has_the_asked_variance() -> None:
    s = dp.skellam(200_000, 9.0, np.random.default_rng(2))
    assert s.dtype == np.int64 and abs(s.mean()) < 0.03 and s.var() == pytest.approx(9.0, rel=0.02)


def test_an_encoded_input_is_in_the_ring_and_noised() -> None:
    spec = _spec(scale=1000.0)
    x = np.ones(DIM)
    a, f = dp.encode(x, spec, 20, np.random.default_rng(3))
    b, _ = dp.encode(x, spec, 20, np.random.default_rng(4))
    assert a.dtype == np.uint32 and a.size == 64 and int(a.max()) < 1 << 20
    assert f == pytest.approx(1 / math.sqrt(DIM)) and not np.array_equal(a, b)


# -- the noise in the securely aggregated sum ---------------------------------------------------

@pytest.mark.parametrize("survivors", [5, 3], ids=["every survivor", "only the quorum"])
def test_the_secure_sum_carries_the_target_noise(survivors: int) -> None:
    """Five devices, noise calibrated for a quorum of three: with all five the sum carries 5/3 of
    the target variance, with only three exactly the target; never less."""
    n, quorum, z, ring_bits = 5, 3, 0.5, 32
    scale = dp.size_scale(1.0, z, quorum, n, DIM, ring_bits, 1e-6)
    spec = _spec(scale, z=z, quorum=quorum)
    rng = np.random.default_rng(10 + survivors)
    xs = _inputs(n, rng)[:survivors]
    clipped = sum(dp.clip_l2(x, 1.0)[0] for x in xs)
    noise = np.stack([_secure_sum(xs, spec, ring_bits, rng) - clipped for _ in range(200)])  # (draws, DIM)
    target = spec.sum_std ** 2
    want = survivors / quorum * target
    # 10,000 samples: the variance's standard error is about 1.4 %; rounding adds < 1e-12 here.
    assert noise.var() == pytest.approx(want, rel=0.06)
    assert abs(noise.mean()) < 4 * math.sqrt(want / noise.size)
    assert noise.var() >= 0.94 * target


def test_a_smaller_ring_decodes_the_same_sum() -> None:
    """Wrap-around is what the ring bits are sized against: a 20-bit ring with its own scale
    decodes the sum as well (relative to its noise) as a 32-bit one."""
    rng = np.random.default_rng(5)
    xs = _inputs(4, rng)
    clipped = sum(dp.clip_l2(x, 1.0)[0] for x in xs)
    for bits in (20, 32):
        spec = _spec(dp.size_scale(1.0, 0.5, 3, 4, DIM, bits, 1e-6), z=0.5)
        err = _secure_sum(xs, spec, bits, rng) - clipped
        assert np.abs(err).max() < dp.noise_allowance(spec, 4, DIM)


def test_honest_noisy_sums_stay_inside_the_noise_allowance() -> None:
    rng = np.random.default_rng(6)
    spec = _spec(dp.size_scale(1.0, 1.0, 2, 3, DIM, 24, 1e-6), quorum=2)
    xs = _inputs(3, rng)
    clipped = sum(dp.clip_l2(x, 1.0)[0] for x in xs)
    allowance = dp.noise_allowance(spec, 3, DIM)
    worst = max(float(np.abs(_secure_sum(xs, spec, 24, rng) - clipped).max()) for _ in range(100))
    assert worst < allowance < 10 * math.sqrt(1.5) * spec.sum_std  # not so wide it admits anything


# -- wrap-around -------------------------------------------------------------------------------

def test_the_sized_scale_is_the_largest_under_the_wrap_bound() -> None:
    for n, bits, target in [(100, 24, 1e-4), (10, 16, 1e-3), (1000, 32, 1e-6)]:
        scale = dp.size_scale(1.0, 1.0, 3, n, DIM, bits, target)
        assert dp.wrap_bound(_spec(scale), n, DIM, bits) <= target
        assert dp.wrap_bound(_spec(scale * 1.01), n, DIM, bits) > target


def test_a_roomy_ring_stops_at_what_poisson_sampling_draws_exactly() -> None:
    scale = dp.size_scale(1.0, 1.0, 3, 5, DIM, 32, 1e-6)
    assert dp.wrap_bound(_spec(scale), 5, DIM, 32) < 1e-12
    assert _spec(scale).local_variance / 2 == pytest.approx(dp.MAX_POISSON_MEAN, rel=1e-6)
    with pytest.raises(SchemaError, match="Poisson"):
        _spec(scale * 1.01)


def test_a_ring_too_small_is_refused() -> None:
    with pytest.raises(ConfigError, match="ring"):
        dp.size_scale(1.0, 1.0, 3, 1000, DIM, 8, 1e-6)


def test_wrap_around_stays_under_its_bound_empirically() -> None:
    """Worst case for the ring: every device sends the same vector at the full clip (their sum
    has norm n c). At the sized scale wraps are rarer than the bound (here: none in 300 rounds,
    with a bound of 5 %); at 8x that scale they are frequent, so the check can see one."""
    n, bits, quorum = 4, 12, 2
    x = np.zeros(DIM)
    x[3] = 1.0
    rng = np.random.default_rng(7)

    def wrap_rate(scale: float, rounds: int) -> float:
        spec = _spec(scale, quorum=quorum)
        wraps = 0
        for _ in range(rounds):
            ints = [dp.centre(dp.encode(x, spec, bits, rng)[0], bits) for _ in range(n)]  # each input alone fits
            true_sum = np.sum(ints, axis=0)
            wraps += bool((true_sum < -(1 << (bits - 1))).any() or (true_sum >= 1 << (bits - 1)).any())
        return wraps / rounds

    scale = dp.size_scale(1.0, 1.0, quorum, n, DIM, bits, 0.05)
    bound = dp.wrap_bound(_spec(scale, quorum=quorum), n, DIM, bits)
    assert bound <= 0.05
    assert wrap_rate(scale, 300) <= bound
    assert wrap_rate(8 * scale, 100) > 0.05


# -- the spec on the wire ------------------------------------------------------------------------

def _round(dps: dp.DPSpec | None) -> M.RoundSpec:
    sa = M.SecAggSpec(node_ids=(0, 1, 2), threshold=2, graph_seed=bytes(32), clip=0.1, ring_bits=32, value_bits=30,
                      weight_norm=1, sketch_block=0, dp=dps)
    return M.RoundSpec(round=1, participants=("a", "b", "c"), local_steps=1, learning_rate=0.1,
                       lora=M.LoraSpec(r=2, alpha=4.0, dropout=0.0, target_modules=("q",)), base_digest="0" * 64,
                       deadline_s=10.0, seed=1, adapter=(),
                       sparse=M.SparseSpec(method="dense", dim=4, k=4, seed=0, indices=b"", value_dtype="float32"), secagg=sa)


def test_the_dp_spec_travels_in_the_round_spec() -> None:
    spec = _round(_spec(1234.5))
    assert M.decode(M.encode(spec)) == spec
    plain = M.encode(_round(None))
    assert b"rotation_seed" not in plain and M.decode(plain) == _round(None)  # a spec without DP keeps its bytes


@pytest.mark.parametrize(("field", "value"), [("rotation_seed", b"short"), ("quorum", 0), ("scale", -1.0),
                                              ("noise_multiplier", float("nan")), ("mechanism", "gaussian")])
def test_a_bad_dp_spec_is_refused(field: str, value: object) -> None:
    good = M.encode(_round(_spec(10.0)))
    import msgpack

    env = msgpack.unpackb(good, raw=False)
    env["b"]["secagg"]["dp"][field] = value
    with pytest.raises(SchemaError):
        M.decode(msgpack.packb(env, use_bin_type=True))


def test_masked_dim_is_padded_only_under_dp() -> None:
    spec = _round(_spec(10.0))
    assert spec.secagg is not None
    assert update_codec.secagg_dim(spec.sparse, spec.secagg) == 6
    assert update_codec.masked_dim(spec.sparse, spec.secagg) == 8
    no_dp = _round(None).secagg
    assert no_dp is not None and update_codec.masked_dim(spec.sparse, no_dp) == 6


def test_a_quorum_above_the_threshold_is_refused() -> None:
    assert dp.check_round(_spec(10.0, quorum=3), threshold=3) == ""
    assert "calibrated for 4 survivors" in dp.check_round(_spec(10.0, quorum=4), threshold=3)


# -- accounting ------------------------------------------------------------------------------------

def test_skellam_rdp_is_the_papers_bound() -> None:
    cost = dp_account.RoundCost(l1=40.0, l2=10.0, variance=150.0)
    for a in (2, 7, 64):
        want = a * 100 / 300 + min(((2 * a - 1) * 100 + 240) / (4 * 150 ** 2), 120 / 300)
        assert dp_account.skellam_rdp(cost, [a])[0] == pytest.approx(want, rel=1e-12)


def test_the_conversion_is_the_rdp_to_dp_formula() -> None:
    # Gaussian RDP a / (2 z^2) per round; epsilon = min_a rdp + log((a-1)/a) - (log delta + log a)/(a-1).
    z, rounds, delta = 1.3, 50, 1e-6
    rdp = np.array([rounds * a / (2 * z * z) for a in dp_account.ORDERS])
    want = min(r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for r, a in zip(rdp, dp_account.ORDERS))
    assert dp_account.rdp_epsilon(rdp, delta) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize(("z", "rounds", "delta"), [(1.0, 100, 1e-5), (0.8, 10, 1e-6), (4.0, 1000, 1e-5)])
def test_skellam_epsilon_approaches_the_libraries_gaussian(z: float, rounds: int, delta: float) -> None:
    """With a fine grid (large scale, so large noise in integer units) the Skellam mechanism is the
    Gaussian one: its epsilon meets dp-accounting's RdpAccountant on GaussianDpEvent from above."""
    gauss = dp_account.gaussian_epsilon(z, rounds, delta)
    fine = dp_account.epsilon([dp_account.round_cost(_spec(1e5, z=z), 1000)] * rounds, delta)
    coarse = dp_account.epsilon([dp_account.round_cost(_spec(3.0, z=z), 1000)] * rounds, delta)
    assert gauss <= fine <= gauss * 1.001
    assert coarse > fine * 1.05  # a coarse grid costs: rounding inflates the sensitivity


def test_epsilon_composes_over_rounds() -> None:
    cost = dp_account.round_cost(_spec(1e5, z=2.0), DIM)
    eps = [dp_account.epsilon([cost] * r, 1e-5) for r in (0, 1, 10, 100)]
    assert eps[0] == 0.0 and all(a < b for a, b in itertools.pairwise(eps))
    assert dp_account.effective_noise_multiplier(cost) == pytest.approx(2.0, rel=1e-3)
