"""The solvers' numerical tolerances, named once.

A solver checks its plans against the caps with a slack tighter than the central plan check's
(:data:`allocator.core.budget.SIZE_RTOL`, 1e-9 relative, plus :data:`~allocator.core.budget.CAP_ATOL`
absolute on resource caps), so every plan a solver accepts passes that check.
"""

from __future__ import annotations

__all__ = ["CAP_RTOL", "OBJECTIVE_RTOL", "ZERO_CAP"]

#: Relative slack of a solver's own capacity tests (``used ≤ cap · (1 + CAP_RTOL)``, or
#: ``≤ 1 + CAP_RTOL`` for a use normalised by its cap): the round-off of summing a plan's sizes.
CAP_RTOL = 1e-12
#: Caps at or below this are zero caps: every slot that uses the resource is forbidden (dividing
#: by a subnormal cap would overflow).
ZERO_CAP = 1e-12
#: Relative round-off of an objective or a bound, of the magnitudes summed into it: differences
#: below it are ties (no improvement, no pruning).
OBJECTIVE_RTOL = 1e-12
