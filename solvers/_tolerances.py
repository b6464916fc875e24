"""The solvers' numerical tolerances, named once.

A solver checks its plans against the caps with a slack tighter than the central plan check's
(:data:`allocator.core.budget.SIZE_RTOL`, 1e-9 relative, plus :data:`~allocator.core.budget.CAP_ATOL`
absolute on resource caps), so every plan a solver accepts passes that check. The problem every
solver optimises is the one :func:`within_cap` states: the central check's absolute slack is there
for round-off, it does not widen a zero cap into a small positive one (a unit using 1e-71 of a
resource capped at 0 uses it).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["CAP_RTOL", "OBJECTIVE_RTOL", "ZERO_CAP", "within_cap"]

#: Relative slack of a solver's own capacity tests (``used ≤ cap · (1 + CAP_RTOL)``, or
#: ``≤ 1 + CAP_RTOL`` for a use normalised by its cap): the round-off of summing a plan's sizes.
CAP_RTOL = 1e-12
#: Caps at or below this are zero caps: every slot that uses the resource is forbidden (dividing
#: by a subnormal cap would overflow).
ZERO_CAP = 1e-12
#: Relative round-off of an objective or a bound, of the magnitudes summed into it: differences
#: below it are ties (no improvement, no pruning).
OBJECTIVE_RTOL = 1e-12


def within_cap(used: npt.ArrayLike, cap: float) -> np.ndarray:
    """Whether ``used`` meets ``cap`` as every solver reads it (elementwise for arrays).

    ``used ≤ cap · (1 + CAP_RTOL)``, and ``used ≤ 0`` for a zero cap (``cap ≤ ZERO_CAP``).
    """
    used = np.asarray(used, dtype=np.float64)
    if cap <= ZERO_CAP:
        return used <= 0.0
    return used <= cap * (1 + CAP_RTOL)
