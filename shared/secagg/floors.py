"""What a device requires of a secure round, whatever the aggregator's round spec says.

The aggregator chooses the cohort, the threshold and which adverts count; a device that took
those as given could be talked into a round where its input is not hidden (a threshold just
above half of a small neighbourhood, a cohort of two). So each device holds floors of its own,
from its profile and its config (the stricter of the two wins), and refuses, with a signed
``declined`` and the reason, a round below them.

Why t > (k + c) / 2: the aggregator learns one device u's input only by rebuilding both of u's
secrets, t shares of each, from u's k neighbours (u included). Each honest neighbour reveals at
most one of the two, for the one survivor set it signed; a colluding neighbour gives both. With
c colluders among the k, two conflicting survivor sets can each gather t signatures and t shares
only if 2t <= (k - c) + 2c, i.e. t <= (k + c) / 2. So a round's threshold t tolerates
c = 2t - k - 1 colluders in any neighbourhood, and the default t = ceil(2k/3) tolerates about k/3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.config import require
from shared.errors import ProtocolError


class BelowFloor(ProtocolError):
    """The round asks for less than this device's floor: it declines the round."""


def tolerated_colluders(k: int, t: int) -> int:
    """The most colluders a neighbourhood of k with threshold t tolerates: 2t - k - 1 (>= 0 or -1)."""
    return max(-1, 2 * t - k - 1)


@dataclass(frozen=True)
class Floors:
    """A device's secure-aggregation floors.

    min_cohort: fewest participants in a round, and fewest survivors this device signs for
        (below it, a sum says too much about each input in it).
    min_threshold: t >= ceil(min_threshold * k), k the neighbourhood size; 2/3 by default (the
        Bonawitz 1/3 dropout budget, and about k/3 tolerated colluders).
    colluders: c, the colluders this device wants tolerated in its neighbourhood: t > (k + c) / 2.
    """

    min_cohort: int = 3
    min_threshold: float = 2 / 3
    colluders: int = 0

    def __post_init__(self) -> None:
        require(isinstance(self.min_cohort, int) and self.min_cohort >= 2,
                f"secagg min_cohort must be an int >= 2, got {self.min_cohort!r}")
        require(isinstance(self.min_threshold, (int, float)) and 0.5 <= self.min_threshold <= 1.0,
                f"secagg min_threshold must be in [0.5, 1], got {self.min_threshold!r}")
        require(isinstance(self.colluders, int) and self.colluders >= 0,
                f"secagg colluders must be an int >= 0, got {self.colluders!r}")

    def stricter(self, other: Floors) -> Floors:
        return Floors(max(self.min_cohort, other.min_cohort), max(self.min_threshold, other.min_threshold),
                      max(self.colluders, other.colluders))

    def threshold(self, k: int) -> int:
        """The lowest t this device accepts for a neighbourhood of k."""
        by_fraction = math.ceil(self.min_threshold * k - 1e-9)  # 2/3 * 9 is 6.000000000000001 in floats
        return max(2, by_fraction, (k + self.colluders) // 2 + 1)

    def check_round(self, n: int, t: int, k: int) -> None:
        """Raise BelowFloor unless a round of n participants, threshold t, neighbourhood k is acceptable."""
        if n < self.min_cohort:
            raise BelowFloor(f"a cohort of {n}, below this device's minimum of {self.min_cohort}")
        want = self.threshold(k)
        if want > k:
            raise BelowFloor(f"no threshold can tolerate {self.colluders} colluders in a neighbourhood of {k}")
        if t < want:
            raise BelowFloor(f"threshold {t} of a neighbourhood of {k}, below this device's floor of {want} "
                             f"(ceil({self.min_threshold:.3g} k), and t > (k + c)/2 for c = {self.colluders} colluders)")

    def check_survivors(self, m: int, t: int) -> None:
        """Raise BelowFloor unless this device may sign (or reveal for) a survivor set of m with threshold t.

        The aggregator learns the sum over the survivors, so a set must hold at least two inputs
        and at least t (the protocol's own rule). ``min_cohort`` is not applied here: it floors the
        round as announced, and the dropouts a threshold allows are what t is for (with a floor of
        3 on survivors, a 3-device fleet lost every round in which one device dropped out).
        """
        if m < max(2, t):
            raise BelowFloor(f"{m} survivors, below max(2, threshold {t}): not signing")
