"""The device's own privacy accountant: what its contributions to DP rounds have cost it.

The device trusts neither the aggregator's epsilon nor its cohort choice: it recomputes each
round's cost from the signed DP parameters (``shared.dp_account``) and refuses, with a signed
``declined`` naming the reason, a round whose noise is below its floor or that would take its own
epsilon past its maximum. A round is charged when the device sends its masked input (written
before the bytes leave, like the sequence number: a crash wastes budget, never reuses it). The
charged rounds live in ``privacy.json`` in the work dir, one cost per round, so the epsilon can
be recomputed, and audited, from them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from shared import dp, dp_account, update_codec
from shared import messages as M
from shared.errors import ConfigError

log = logging.getLogger(__name__)

FILE = "privacy.json"


@dataclass(frozen=True)
class PrivacyFloors:
    """min_noise_multiplier: refuse a round whose effective noise multiplier (integer noise std over
        the rounded sensitivity, with only the quorum surviving) is below this; set, it also
        refuses rounds without DP. max_epsilon: refuse a round that would take this device's epsilon
        at ``delta`` past this. None: no such floor."""

    min_noise_multiplier: float | None = None
    max_epsilon: float | None = None
    delta: float = 1e-5


def load(work: Path) -> dict[int, dp_account.RoundCost]:
    p = work / FILE
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        return {int(r): dp_account.RoundCost.from_json(c) for r, c in data["rounds"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        # Refuse rather than restart from zero: zero would hand the device a fresh budget.
        raise ConfigError(f"{p}: unreadable privacy accounting ({type(e).__name__}: {e}); restore it from a backup") from None


def save(work: Path, spent: dict[int, dp_account.RoundCost], delta: float) -> None:
    tmp = work / (FILE + ".tmp")
    body = {"delta": delta, "epsilon": dp_account.epsilon(spent.values(), delta),
            "rounds": {str(r): c.to_json() for r, c in sorted(spent.items())}}
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps(body, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, work / FILE)


def round_cost(spec: M.RoundSpec) -> dp_account.RoundCost | None:
    sa = spec.secagg
    if sa is None or sa.dp is None:
        return None
    return dp_account.round_cost(sa.dp, update_codec.secagg_dim(spec.sparse, sa, spec.scoring))


class DeviceAccountant:
    def __init__(self, work: Path, floors: PrivacyFloors) -> None:
        self.work, self.floors = work, floors
        self.spent = load(work)

    @property
    def epsilon(self) -> float:
        return dp_account.epsilon(self.spent.values(), self.floors.delta)

    def refusal(self, spec: M.RoundSpec) -> str:
        """Why this device declines the round, or ""."""
        sa, f = spec.secagg, self.floors
        dps = sa.dp if sa is not None else None
        if dps is None:
            if f.min_noise_multiplier is not None:
                return (f"round {spec.round} adds no DP noise, below this device's floor of noise multiplier "
                        f"{f.min_noise_multiplier:g}")
            return ""
        assert sa is not None
        why = dp.check_round(dps, sa.threshold)
        if why:
            return why
        cost = round_cost(spec)
        assert cost is not None
        z = dp_account.effective_noise_multiplier(cost)
        if f.min_noise_multiplier is not None and z < f.min_noise_multiplier:
            return (f"round {spec.round}'s noise multiplier {z:.4g} (with its quorum of {dps.quorum}) is below this "
                    f"device's floor of {f.min_noise_multiplier:g}")
        if f.max_epsilon is not None and spec.round not in self.spent:
            after = dp_account.epsilon([*self.spent.values(), cost], f.delta)
            if after > f.max_epsilon:
                return (f"round {spec.round} would take this device's epsilon to {after:.4g} at delta {f.delta:g}, past "
                        f"its maximum of {f.max_epsilon:g} (spent {self.epsilon:.4g} in {len(self.spent)} round(s))")
        return ""

    def charge(self, spec: M.RoundSpec) -> float | None:
        """Count the round this device is about to send to (once); its epsilon after, or None (no DP)."""
        cost = round_cost(spec)
        if cost is None:
            return None
        self.spent[spec.round] = cost
        save(self.work, self.spent, self.floors.delta)
        return self.epsilon
