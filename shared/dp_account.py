"""Privacy accounting of Skellam rounds (``shared.dp``): epsilon at delta after any rounds.

dp-accounting (0.6) has no Skellam event, so each round's Renyi DP is the published bound of the
multi-dimensional Skellam mechanism (Agarwal, Kairouz, Liu, NeurIPS 2021, arXiv 2110.04995,
Theorem 3.5 / Corollary 3.6): for integer order a > 1, integer L1 and L2 sensitivities D1, D2
and noise of variance mu per coordinate,

    eps(a) <= a D2^2 / (2 mu) + min( ((2a - 1) D2^2 + 6 D1) / (4 mu^2),  3 D1 / (2 mu) ).

The first term is the Gaussian mechanism's RDP; the second is what the integer noise costs on top
and vanishes as mu grows (tests check the limit against dp-accounting's ``GaussianDpEvent`` in
its ``RdpAccountant``). Rounds compose by adding RDP order by order; the conversion to
(epsilon, delta) is dp-accounting's own (``rdp_privacy_accountant.compute_epsilon``).

mu is the noise of the *quorum*: the fewest survivors a sum is ever unmasked with, so the least
noise any released sum carries. It counts every survivor's share, the protected device's own
included, so it assumes the survivors follow the protocol: a survivor colluding with the
aggregator can subtract its own share, and then the sum carries (quorum - colluders) / quorum of
the target variance (set the quorum with that margin).

Neighbouring relation: one device's whole contribution replaced by zeros (client-level DP, the
"zero-out" relation of distributed DP). Which devices took part is not what DP hides here: secure
aggregation shows the aggregator who survived. The sensitivity is the norm of one contribution.

No amplification by sampling is claimed: the aggregator, which a device does not trust, chooses
each cohort. dp-accounting is imported lazily: it is only needed where epsilon is computed, not
to encode a round.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from shared import dp
from shared.errors import ConfigError

# Integer orders only: the Skellam bound is proved for integer a.
ORDERS: tuple[int, ...] = tuple(range(2, 65)) + (80, 96, 128, 160, 192, 256, 384, 512, 768, 1024)


@dataclass(frozen=True)
class RoundCost:
    """One round's mechanism, in the integer domain: what its RDP follows from."""

    l1: float  # L1 sensitivity of one device's rounded, scaled, rotated vector
    l2: float  # its L2 sensitivity
    variance: float  # Skellam variance per coordinate of the sum of the quorum's noise

    def to_json(self) -> dict[str, float]:
        return {"l1": self.l1, "l2": self.l2, "variance": self.variance}

    @staticmethod
    def from_json(d: dict[str, float]) -> RoundCost:
        return RoundCost(float(d["l1"]), float(d["l2"]), float(d["variance"]))


def round_cost(spec: dp.DPSpec, dim: int) -> RoundCost:
    """The cost of one round of ``spec`` on a ``dim``-coordinate contribution."""
    l1, l2 = dp.sensitivity(spec, dp.ring_dim(dim))
    return RoundCost(l1, l2, spec.quorum * spec.local_variance)


def effective_noise_multiplier(cost: RoundCost) -> float:
    """Noise std over sensitivity in the integer domain (below the nominal z by the rounding's share)."""
    return float(np.sqrt(cost.variance) / cost.l2)


def skellam_rdp(cost: RoundCost, orders: Iterable[int] = ORDERS) -> np.ndarray:
    a = np.asarray(list(orders), dtype=np.float64)
    mu, l1, l2sq = cost.variance, cost.l1, cost.l2 ** 2
    return a * l2sq / (2 * mu) + np.minimum(((2 * a - 1) * l2sq + 6 * l1) / (4 * mu ** 2), 3 * l1 / (2 * mu))


def rdp_epsilon(rdp: np.ndarray, delta: float, orders: Iterable[int] = ORDERS) -> float:
    from dp_accounting.rdp import rdp_privacy_accountant

    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    eps, _ = rdp_privacy_accountant.compute_epsilon(list(orders), list(np.asarray(rdp, dtype=np.float64)), delta)
    return float(eps)


def epsilon(costs: Iterable[RoundCost], delta: float) -> float:
    """Epsilon at ``delta`` after the rounds ``costs`` (0 for none)."""
    total = np.zeros(len(ORDERS))
    any_round = False
    for c in costs:
        total += skellam_rdp(c)
        any_round = True
    return rdp_epsilon(total, delta) if any_round else 0.0


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The Gaussian limit, from dp-accounting alone: ``rounds`` Gaussian mechanisms of this noise
    multiplier, no sampling, in its ``RdpAccountant`` over the same orders."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant(orders=list(ORDERS))
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), rounds))
    return float(acc.get_epsilon(delta))
