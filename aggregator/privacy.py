"""The fleet's privacy budget under distributed DP: epsilon after every round, and the stop.

The round loop calls two hooks: ``admit`` once a round is planned and before it is announced
(raises ``BudgetSpent`` when the round would take epsilon past the target, so the fleet stops
*before* exceeding it), and ``charge`` once it is announced (the round's entry for
``metrics.jsonl``). Every announced DP round is charged, whether or not its sum was unmasked:
the aggregator cannot prove to anyone that it did not unmask, so the fleet's epsilon is an upper
bound on every device's (each device also keeps its own, ``edge_client.privacy``).

Epsilon is for the worst-placed device: one in every round, with only the quorum surviving (the
least noise). No amplification by sampling: the cohort is chosen here, by the party the
guarantee is against. The accountant is rebuilt from ``metrics.jsonl`` on a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from aggregator.config import DPSettings
from aggregator.record import RoundRecord
from shared import dp, dp_account, update_codec
from shared import messages as M

log = logging.getLogger(__name__)


class BudgetSpent(Exception):
    """The next round would take the fleet's epsilon past the configured target: no more rounds."""


def stop_reason(spent: list[dp_account.RoundCost], nxt: dp_account.RoundCost, target: float, delta: float) -> str:
    """Why the fleet must stop instead of running a round costing ``nxt``, or "" (target 0: never)."""
    if not target:
        return ""
    after = dp_account.epsilon([*spent, nxt], delta)
    if after > target:
        return (f"the next round would take epsilon to {after:.4g} at delta {delta:g}, past the target {target:g} "
                f"(epsilon {dp_account.epsilon(spent, delta):.4g} after {len(spent)} DP round(s))")
    return ""


def spec_dim(spec: M.RoundSpec) -> int:
    assert spec.secagg is not None
    return update_codec.secagg_dim(spec.sparse, spec.secagg, spec.scoring)


class FleetAccountant:
    def __init__(self, settings: DPSettings, spent: Iterable[dp_account.RoundCost] = ()) -> None:
        self.settings = settings
        self.spent = list(spent)

    @staticmethod
    def from_records(settings: DPSettings, records: Iterable[RoundRecord]) -> FleetAccountant:
        """The accountant as the recorded rounds left it (a later record of a round replaces an earlier one)."""
        by_round = {r.round: r.privacy for r in records if r.privacy}
        return FleetAccountant(settings, [dp_account.RoundCost.from_json(p["cost"]) for _, p in sorted(by_round.items())])

    @property
    def epsilon(self) -> float:
        return dp_account.epsilon(self.spent, self.settings.delta)

    def admit(self, spec: M.RoundSpec) -> None:
        """Raise ``BudgetSpent`` unless the planned round fits the target."""
        assert spec.secagg is not None and spec.secagg.dp is not None
        why = stop_reason(self.spent, dp_account.round_cost(spec.secagg.dp, spec_dim(spec)), self.settings.target_epsilon,
                          self.settings.delta)
        if why:
            raise BudgetSpent(why)

    def charge(self, spec: M.RoundSpec) -> dict[str, Any]:
        """Count the announced round; its ``privacy`` entry for the round record."""
        sa = spec.secagg
        assert sa is not None and sa.dp is not None
        dim = spec_dim(spec)
        cost = dp_account.round_cost(sa.dp, dim)
        self.spent.append(cost)
        eps = self.epsilon
        log.info("round %d: epsilon %.4g at delta %g after %d DP round(s) (z %.3g, quorum %d)", spec.round, eps,
                 self.settings.delta, len(self.spent), sa.dp.noise_multiplier, sa.dp.quorum)
        return {"mechanism": sa.dp.mechanism, "epsilon": eps, "delta": self.settings.delta, "rounds": len(self.spent),
                "target_epsilon": self.settings.target_epsilon or None, "l2_clip": sa.dp.l2_clip,
                "noise_multiplier": sa.dp.noise_multiplier,
                "effective_noise_multiplier": dp_account.effective_noise_multiplier(cost), "quorum": sa.dp.quorum,
                "scale": sa.dp.scale, "ring_bits": sa.ring_bits,
                "wrap_bound": dp.wrap_bound(sa.dp, len(sa.node_ids), dim, sa.ring_bits),
                "amplification": "none: the aggregator chooses the cohort", "cost": cost.to_json()}
