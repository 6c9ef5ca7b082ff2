"""Enforce the device profile against what a round asks for.

Whether the profile can train the student at all is the memory planner's decision
(``edge_client.planner``), not a parameter count: there is no size cap here.
"""

from __future__ import annotations

from shared.messages import RoundSpec
from shared.profiles import DeviceProfile


class Declined(Exception):
    """This device will not contribute to the round; the message is the reason it publishes
    (a signed "declined" status), so the aggregator stops waiting for it at once."""


class BudgetExceeded(Declined):
    """The round asks for more than this device's profile allows; the device declines it."""


class NonFiniteUpdate(Declined):
    """Local training produced NaN or Inf: sending it (masked, nobody could tell) would poison the sum."""


def local_steps(profile: DeviceProfile, spec: RoundSpec) -> int:
    """Steps to run: what the round asks, capped by the profile; rank above the cap is refused."""
    if spec.lora.r > profile.max_lora_rank:
        raise BudgetExceeded(f"round asks LoRA rank {spec.lora.r}; profile {profile.name} allows {profile.max_lora_rank}")
    return min(spec.local_steps, profile.max_steps_per_round)
