"""Operating-point refinement: re-linearise the cost table around the plan, re-solve, repeat.

A cost table is a linearisation at the full-precision model: ``cost(u, o)`` is the loss increase
when unit ``u`` alone uses option ``o``. At 2–4 bpw every unit is quantized and the errors
compound, so the table's additive model is least accurate exactly where the plan lives. This
module measures the table again *at the plan* ``P`` (successive knapsack, a trust-region
method).

The calibration samples are split by sample hash (:mod:`allocator.model.data.split`) into a
*fit* share F and a *validation* share V (``validation_share``, 25 % by default): moves are
measured on F, and every decision is judged on V, data the moves were not measured on.

1. ``D_F(P)``, ``D_V(P)`` = the distortion of the model quantized as ``P`` against the
   full-precision outputs on F and on V (the metric the plan is judged by: token-mean KL,
   1 − cos, ...).
2. For every unit ``u`` and each of its ``neighbours`` options on either side of ``P(u)`` (by
   size), ``Δ_u(o) = D_F(P with u → o) − D_F(P)``, measured with every other unit still at ``P``
   (the block cache recomputes only the blocks after ``u``).
3. Re-solve the multiple-choice knapsack over ``{P(u)} ∪ neighbours`` with costs ``Δ_u(o)``
   (shifted per unit to be ≥ 0, which leaves the argmin unchanged) at the same budget, with a
   move penalty ``λ`` found by bisection so that at most ``m`` units change: the trust region
   ``Σ_u [o_u ≠ P(u)] ≤ m``.
4. Accept the trial plan ``P'`` iff ``D_V(P') < D_V(P)`` and ``D_F(P') < D_F(P)`` (it helps on
   the data it was fitted on *and* on the validation share); otherwise halve ``m``. Stop when
   no move is predicted to help or ``m`` reaches 0 (validation stopped improving), or after
   ``rounds`` rounds.

The start is the candidate with the lowest ``D_V``, and every accepted plan measured lower on V
than the one before it, so the result is never worse than any candidate (e.g. the uniform plan
that fits) *on the validation share*. With ``validation_share=0`` F = V = all calibration
samples (the fitted data judges itself). Held-out quality is checked by the caller.

Cost per round: one forward over F to cache the blocks at ``P``, ``2 · neighbours`` partial
forwards over F per unit, and one full forward over F and V per trial plan (the forward over F
re-caches the blocks, which the next round starts from when the trial is accepted).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from allocator.core.budget import Budget
from allocator.core.errors import InvalidParameterError
from allocator.core.formats import parse_format
from allocator.core.plan import BitPlan, SolverInfo
from allocator.core.table import CostTable
from allocator.core.units import unit_weight
from allocator.model.data.split import DEFAULT_VALIDATION_SHARE, check_share, split_calibration
from sensitivity import BlockCache, default_metric, distortion, make_chunks, per_sample_sums

if TYPE_CHECKING:
    import torch

    from allocator.core.units import Unit
    from allocator.model.quant import Quantizer

__all__ = ["DEFAULT_CACHE_MB", "RefineConfig", "RefineResult", "RefineRound", "RefineStatus", "accepts",
           "move_priority", "refine_plan", "tie_groups", "trust_region_choice"]

log = logging.getLogger(__name__)


class RefineStatus(StrEnum):
    CONVERGED = "converged"  #: no move is predicted to help, or the trust region shrank to 0
    ROUND_LIMIT = "round_limit"  #: stopped after ``rounds`` rounds while still improving
    TIME_LIMIT = "time_limit"  #: stopped by ``time_limit`` (the best plan so far is returned)


#: MiB of block outputs the refinement's block cache keeps by default (:class:`RefineConfig`)
DEFAULT_CACHE_MB = 128


@dataclass(frozen=True, kw_only=True)
class RefineConfig:
    """Settings of :func:`refine_plan`.

    Attributes:
        rounds: maximum number of re-linearise / re-solve rounds (0: only pick the best candidate).
        neighbours: options measured on each side of a unit's current option (by size).
        trust: initial trust region as a fraction of the units that may change per round.
        max_tokens: tokens per forward chunk of the block cache.
        time_limit: seconds for measuring the candidates and the refinement rounds (None: no
            limit). When it runs out, the groups not yet measured keep their option this round
            (the most promising groups, by the table's cost of a one-step move, are measured
            first), no smaller trust region is tried and no further round starts; the result
            is still the best measured plan. One forward over the calibration data may run past
            it.
        validation_share: share of the calibration samples (by sample hash) that judges the
            candidates and every trial plan; the rest measures the moves (module docstring).
            0: no split, the calibration data judges the moves measured on it. Ignored when
            :func:`refine_plan` is given ``validation`` batches.
        cache_mb: MiB of block outputs the fit share's block cache may keep. Beyond it only
            every few blocks' outputs are kept and a move's replay recomputes up to that many
            blocks more (the same values; SmolLM2-135M at 24 samples: every second block,
            106 of 212 MB). The validation share keeps none: it is only ever run whole.
    """

    rounds: int = 3
    neighbours: int = 1
    trust: float = 0.25
    max_tokens: int = 8192
    time_limit: float | None = None
    validation_share: float = DEFAULT_VALIDATION_SHARE
    cache_mb: int = DEFAULT_CACHE_MB

    def __post_init__(self) -> None:
        check_share(self.validation_share, what="refine validation_share")
        t = self.time_limit
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not t > 0):
            raise InvalidParameterError(f"refine time_limit must be > 0 seconds or None, got {t!r}")
        for name in ("rounds", "neighbours", "max_tokens", "cache_mb"):
            v = getattr(self, name)
            low = 0 if name in ("rounds", "cache_mb") else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InvalidParameterError(f"refine {name} must be an int ≥ {low}, got {v!r}")
        if not (isinstance(self.trust, int | float) and 0 < self.trust <= 1):
            raise InvalidParameterError(f"refine trust must be in (0, 1], got {self.trust!r}")


@dataclass(frozen=True, kw_only=True)
class RefineRound:
    """One round: the errors before, the trial plan's errors, and what moved.

    ``error_*`` are on the validation share (what acceptance is judged by), ``fit_*`` on the fit
    share the moves were measured on (equal when there is no validation share).
    """

    index: int
    error_before: float
    error_trial: float
    fit_before: float
    fit_trial: float
    predicted_change: float
    moved: int
    trust: int
    accepted: bool
    trials: int
    seconds: float


@dataclass(frozen=True, kw_only=True)
class RefineResult:
    """What :func:`refine_plan` chose. ``start_error`` / ``error`` / ``candidates`` are on the
    validation share (the errors decisions were judged by), the ``fit`` ones on the fit share."""

    plan: BitPlan
    start_error: float
    error: float
    rounds: tuple[RefineRound, ...]
    status: RefineStatus
    #: validation error of every candidate given to :func:`refine_plan`, and the one it started from
    candidates: Mapping[str, float] = field(default_factory=dict)
    start_label: str = "plan"
    start_fit_error: float | None = None
    fit_error: float | None = None
    #: fit-share error of every candidate
    candidates_fit: Mapping[str, float] = field(default_factory=dict)
    #: the split (:meth:`allocator.model.data.split.SampleSplit.metadata`); empty: no validation
    #: share, the calibration data judged itself
    validation: Mapping[str, Any] = field(default_factory=dict)

    @property
    def improvement(self) -> float:
        """Relative validation-error reduction from the start plan (0.25 = 25 % lower)."""
        return 0.0 if self.start_error <= 0 else 1.0 - self.error / self.start_error

    @property
    def judged_on(self) -> str:
        """``validation`` when a validation share judged the choices, else ``calibration``."""
        return "validation" if self.validation else "calibration"

    def to_dict(self) -> dict[str, Any]:
        return {"start_error": self.start_error, "error": self.error, "status": str(self.status),
                "improvement": self.improvement, "start": self.start_label,
                "judged_on": self.judged_on, "start_fit_error": self.start_fit_error,
                "fit_error": self.fit_error, "candidates": dict(self.candidates),
                "candidates_fit": dict(self.candidates_fit), "validation": dict(self.validation),
                "rounds": [vars(r) for r in self.rounds]}


# ---------------------------------------------------------------------------- pure pieces
def neighbour_options(sizes: Mapping[str, float], current: str, k: int) -> list[str]:
    """The ``k`` options just below and just above ``current`` by size (ties broken by name)."""
    order = sorted(sizes, key=lambda o: (sizes[o], o))
    i = order.index(current)
    return order[max(0, i - k):i] + order[i + 1:i + 1 + k]


def trust_region_choice(table: CostTable, budget: Budget, current: Mapping[str, str],
                        max_moves: int, *, iterations: int = 40) -> tuple[dict[str, str], float]:
    """Min Σ cost s.t. the budget and ``Σ_u [o_u ≠ current_u] ≤ max_moves``.

    The cardinality cap is relaxed with a move penalty λ (Lagrangian): solve with
    ``cost + λ·[o ≠ current]`` and bisect λ until at most ``max_moves`` units move. λ = ∞ keeps
    ``current``, which fits the budget, so a feasible answer always exists.
    Returns (choice, predicted Σ cost change against ``current``).
    """
    import solvers

    df = table.df
    moved_rows = (df["option"].to_numpy() != df["unit"].map(current).to_numpy()).astype(float)

    def solve(lam: float) -> dict[str, str] | None:
        pen = df.assign(cost=df["cost"] + lam * moved_rows)
        res = solvers.solve(CostTable(pen, table.metadata), budget, solver="mckp")
        return None if res.plan is None else res.plan.choice

    def moves(choice: Mapping[str, str]) -> int:
        return sum(choice[u] != current[u] for u in current)

    best = solve(0.0)
    if best is None:
        return dict(current), 0.0
    if moves(best) > max_moves:
        lo, hi = 0.0, float(df["cost"].max() - df["cost"].min()) + 1.0
        best = dict(current)
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            got = solve(mid)
            if got is not None and moves(got) <= max_moves:
                best, hi = got, mid
            else:
                lo = mid
    cost = df.set_index(["unit", "option"])["cost"]
    change = float(sum(cost[(u, best[u])] - cost[(u, current[u])] for u in current))
    return best, change


# ---------------------------------------------------------------------------- measurement
class _Meter:
    """Distortion of the model against fixed full-precision outputs, by block-cache replay."""

    def __init__(self, model: torch.nn.Module, batches: Sequence[Mapping[str, Any]], *, kind: str,
                 max_tokens: int, cache_bytes: int) -> None:
        from allocator.model.outputs import tokens_within

        self.model, self.kind, self.cache_bytes = model, kind, cache_bytes
        # a chunk's logits within OUTPUT_CHUNK_BYTES: a large vocabulary gets smaller chunks
        self.chunks = make_chunks(batches, max_tokens=tokens_within(model, kind, max_tokens))
        self.cache: Any = BlockCache(model, self.chunks, kind=kind, max_bytes=cache_bytes)
        self.reference = self.cache.reference  # the full-precision outputs, chunk by chunk
        self.forwards = 0

    def rebuild(self) -> float:
        """Cache every block at the model's current weights; returns the current distortion.

        The outputs of that forward are compared chunk by chunk as they come, not kept."""
        from allocator.core.rss import trim_heap

        self.cache = None  # the old cache's block outputs go before the new ones are recorded
        # they are sub-MiB tensors (one block's output for one chunk): freed ones stay in the heap
        trim_heap()
        sums = _ErrorSums(self.kind)
        self.cache = BlockCache(self.model, self.chunks, kind=self.kind, max_bytes=self.cache_bytes,
                                on_output=lambda chunk, out: sums.add(self.reference[len(sums)],
                                                                      out, chunk.mask))
        self.forwards += 1
        return sums.value

    def error_from(self, start: int) -> float:
        self.forwards += 1
        return self._error(lambda ci: self.cache.outputs_from(ci, start))

    def full_error(self) -> float:
        self.forwards += 1
        return self._error(lambda ci: self.cache.outputs_from(ci, 0))

    def _error(self, outputs: Callable[[int], torch.Tensor]) -> float:
        import torch

        sums = _ErrorSums(self.kind)
        with torch.inference_mode():
            for ci, chunk in enumerate(self.cache.chunks):
                sums.add(self.reference[ci], outputs(ci), chunk.mask)
        return sums.value


class _ErrorSums:
    """Token- (or sample-) mean distortion accumulated chunk by chunk, in chunk order."""

    def __init__(self, kind: str) -> None:

        self.metric = default_metric(kind)
        self.total = self.count = 0.0
        self.chunks = 0

    def add(self, reference: torch.Tensor, output: torch.Tensor, mask: torch.Tensor | None) -> None:
        import torch


        with torch.inference_mode():
            s, n = per_sample_sums(distortion(self.metric, reference, output), mask)
        self.total += float(s.sum())
        self.count += float(n.sum())
        self.chunks += 1

    def __len__(self) -> int:
        return self.chunks

    @property
    def value(self) -> float:
        return self.total / max(self.count, 1.0)


class _Weights:
    """Sets unit weights to Q_o(W_fp) with the plan's quantizer and restores them; W_fp is kept
    once, on disk (read back one unit at a time: not a second copy of the model in memory). A
    unit already at the asked option is left alone, so a plan change re-quantizes only the units
    that move (and the quantizer's cache answers a unit's earlier options)."""

    def __init__(self, model: torch.nn.Module, units: Sequence[Unit], quantizer: Quantizer) -> None:
        from allocator.model.output_store import TensorStash

        self.units = {u.name: u for u in units}
        self.views = {u.name: unit_weight(model, u) for u in units}
        self.original = TensorStash(self.views)
        self.quantizer = quantizer
        self.at: dict[str, str] = {}  #: unit → the option its weight holds now (absent: W_fp)

    def set(self, unit: str, option: str) -> None:
        import torch

        if self.at.get(unit) == option:
            return
        fmt = parse_format(option)
        with torch.no_grad():
            w = self.original[unit]
            self.views[unit].copy_(self.quantizer.quantize(self.units[unit], w, fmt))
        self.at[unit] = option

    def set_plan(self, choice: Mapping[str, str]) -> None:
        for u, o in choice.items():
            self.set(u, o)

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for k, v in self.views.items():
                v.copy_(self.original[k])
        self.at.clear()


# ---------------------------------------------------------------------------- driver
def refine_plan(
    model: torch.nn.Module,
    plan: BitPlan | Mapping[str, BitPlan],
    table: CostTable,
    budget: Budget,
    batches: Sequence[Mapping[str, Any]],
    units: Sequence[Unit],
    *,
    kind: str,
    config: RefineConfig | None = None,
    on_round: Callable[[RefineRound], None] | None = None,
    quantizer: Quantizer | None = None,
    validation: Sequence[Mapping[str, Any]] | None = None,
) -> RefineResult:
    """Refine the best of ``plan`` around its own operating point (module docstring).

    Unit weights are set with ``quantizer`` (RTN by default; the plan's own quantizer, e.g. a
    :class:`allocator.model.quant.GptqQuantizer` for ``--method gptq``); only units whose
    option changes are quantized again.

    ``batches`` are split into fit and validation shares by ``config.validation_share``, unless
    ``validation`` gives the validation batches (then ``batches`` are the fit share whole).
    ``plan`` may be several labelled candidates (e.g. the cost-table optimum and the uniform
    plan that fits): each is measured on the validation share and refinement starts from the
    lowest, so the result measures no worse than any candidate there (``rounds=0`` only
    selects). The model's weights are restored before returning.

    Raises:
        InvalidParameterError: no candidate, table units that are not model units, or too few
            calibration samples for the validation share.
    """
    cfg = config or RefineConfig()
    cands = {"plan": plan} if isinstance(plan, BitPlan) else dict(plan)
    if not cands:
        raise InvalidParameterError("refine: no candidate plan given")
    by_name = {u.name: u for u in units}
    missing = [u for u in table.units if u not in by_name]
    if missing:
        raise InvalidParameterError(f"refine: table units {missing[:3]} are not model units; "
                                    "pass the units the table was estimated on")
    groups = tie_groups(table)
    sizes = {g: {str(o): float(v) for o, v in table.df[table.df["unit"].isin(members)]
                 .groupby("option")["size_bits"].sum().items()} for g, members in groups.items()}
    from allocator.model.quant import RtnQuantizer

    fit_batches, val_batches, split_info = _shares(batches, validation, cfg.validation_share)
    weights = _Weights(model, [by_name[u] for u in table.units], quantizer or RtnQuantizer())
    rounds: list[RefineRound] = []
    status = RefineStatus.ROUND_LIMIT if cfg.rounds else RefineStatus.CONVERGED
    deadline = None if cfg.time_limit is None else time.perf_counter() + cfg.time_limit
    try:
        meter = _Meter(model, fit_batches, kind=kind, max_tokens=cfg.max_tokens,
                       cache_bytes=cfg.cache_mb * 2**20)
        judge = meter if val_batches is None else \
            _Meter(model, val_batches, kind=kind, max_tokens=cfg.max_tokens, cache_bytes=0)
        starts = {g: min(meter.cache.start_block(by_name[u]) for u in members)
                  for g, members in groups.items()}
        measured: dict[str, float] = {}
        measured_fit: dict[str, float] = {}
        for label, cand in cands.items():
            weights.set_plan(cand.choice)
            measured[label] = judge.full_error()
            measured_fit[label] = measured[label] if judge is meter else meter.full_error()
        start_label = min(measured, key=lambda k: measured[k])
        start = cands[start_label]
        current = dict(start.choice)
        weights.set_plan(current)
        fit = start_fit = meter.rebuild()
        error = start_error = fit if judge is meter else measured[start_label]
        trust = max(1, int(round(cfg.trust * table.n_units)))
        for r in range(cfg.rounds):
            if deadline is not None and time.perf_counter() > deadline:
                status = RefineStatus.TIME_LIMIT
                break
            step, choice = _round(r, _Judged(meter, judge), weights, table, budget, groups, current,
                                  sizes, starts, (fit, error), trust, cfg.neighbours, deadline)
            trust = step.trust
            rounds.append(step)
            if on_round is not None:
                on_round(step)
            if not step.accepted:
                late = deadline is not None and time.perf_counter() > deadline
                status = RefineStatus.TIME_LIMIT if late else RefineStatus.CONVERGED
                break
            current, fit, error = choice, step.fit_trial, step.error_trial
    finally:
        weights.restore()
    info = SolverInfo(name=f"{start.solver.name}+refine", status=start.solver.status, gap=None,
                      seconds=start.solver.seconds + sum(s.seconds for s in rounds),
                      params={**dict(start.solver.params), "refine_rounds": len(rounds),
                              "refine_status": str(status), "refine_start": start_label})
    refined = BitPlan.from_choice(table, current, budget=budget, solver=info) if rounds and \
        current != start.choice else start
    return RefineResult(plan=refined, start_error=start_error, error=error, rounds=tuple(rounds),
                        status=status, candidates=measured, start_label=start_label,
                        start_fit_error=start_fit, fit_error=fit, candidates_fit=measured_fit,
                        validation=split_info)


def _shares(batches: Sequence[Mapping[str, Any]], validation: Sequence[Mapping[str, Any]] | None,
            share: float) -> tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]] | None,
                                   dict[str, Any]]:
    """(fit batches, validation batches or None, the split's record) (:func:`refine_plan`)."""
    if validation is not None:
        val = list(validation)
        if not val:
            raise InvalidParameterError("refine: validation is an empty list of batches; pass "
                                        "batches or None to split the calibration data")
        from allocator.model.data.batches import batches_fingerprint

        return batches, val, {"given": True, "validation_fingerprint": batches_fingerprint(val),
                              "fit_fingerprint": batches_fingerprint(list(batches))}
    if share == 0:
        return batches, None, {}
    split = split_calibration(list(batches), share)
    return split.fit, split.validation, split.metadata()


@dataclass(frozen=True)
class _Judged:
    """The fit share's meter (moves, block cache) and the validation share's (judgement); the
    same meter when there is no validation share."""

    fit: _Meter
    judge: _Meter

    def measure(self) -> tuple[float, float]:
        """(D_F, D_V) at the model's current weights; re-caches the fit share's blocks there."""
        f = self.fit.rebuild()
        return f, (f if self.judge is self.fit else self.judge.full_error())

    @property
    def forwards(self) -> int:
        return self.fit.forwards + (0 if self.judge is self.fit else self.judge.forwards)


def accepts(before: tuple[float, float], trial: tuple[float, float]) -> bool:
    """Accept a trial plan iff it is lower on both shares: ``D_F' < D_F`` and ``D_V' < D_V``
    (``before``/``trial`` are (D_F, D_V)); the validation share is the judge, the fit share
    confirms the move did what it was measured to do."""
    return trial[0] < before[0] and trial[1] < before[1]


def _round(r: int, meters: _Judged, weights: _Weights, table: CostTable, budget: Budget,
           groups: Mapping[str, Sequence[str]], current: dict[str, str],
           sizes: Mapping[str, Mapping[str, float]], starts: Mapping[str, int],
           error: tuple[float, float], trust: int, neighbours: int,
           deadline: float | None) -> tuple[RefineRound, dict[str, str]]:
    """One re-linearise / re-solve / accept-or-shrink round (module docstring, steps 2–4);
    ``error`` is (D_F, D_V) of ``current``."""
    t0 = time.perf_counter()
    f0 = meters.forwards
    order = move_priority(table, groups, current, sizes, neighbours)
    deltas = _measure_moves(meters.fit, weights, groups, current, sizes, starts, error[0],
                            neighbours, order, deadline)
    local = _local_table(table, groups, deltas)
    trials: list[tuple[tuple[float, float], float, int]] = []  # ((D_F, D_V), predicted, moved)
    choice = current
    while trust >= 1:
        if trials and deadline is not None and time.perf_counter() > deadline:
            break  # out of time: keep the plan, no smaller trust region
        choice, predicted = trust_region_choice(local, budget, current, trust)
        changed = {u: choice[u] for u in current if choice[u] != current[u]}
        if not changed or predicted >= 0:
            break
        weights.set_plan(changed)
        # a rejected trial leaves the fit cache at the trial plan: only the next trial (which
        # re-caches) or an accepted round uses it, and a round that ends rejected ends refinement
        trials.append((meters.measure(), predicted, len(changed)))
        if accepts(error, trials[-1][0]):
            break
        weights.set_plan({u: current[u] for u in changed})
        trust //= 2
    accepted = bool(trials) and accepts(error, trials[-1][0])
    last = trials[-1] if trials else (error, 0.0, 0)
    step = RefineRound(index=r, error_before=error[1], error_trial=last[0][1],
                       fit_before=error[0], fit_trial=last[0][0], predicted_change=last[1],
                       moved=last[2], trust=trust, accepted=accepted, trials=len(trials),
                       seconds=time.perf_counter() - t0)
    log.info("refine round %d: fit %.5g -> %.5g, validation %.5g -> %.5g (%s, %d moved, %d forwards)",
             r, step.fit_before, step.fit_trial, step.error_before, step.error_trial,
             "accepted" if accepted else "rejected", step.moved, meters.forwards - f0)
    return step, choice if accepted else current


def tie_groups(table: CostTable) -> dict[str, list[str]]:
    """Move groups: the units of one tie id together (they must share an option), else one unit."""
    ties = table.df.drop_duplicates("unit").set_index("unit")["tie"] if table.has_ties else None
    groups: dict[str, list[str]] = {}
    for u in table.units:
        t = "" if ties is None else str(ties[u] or "")
        groups.setdefault(f"tie:{t}" if t else u, []).append(u)
    return groups


def move_priority(table: CostTable, groups: Mapping[str, Sequence[str]], current: Mapping[str, str],
                  sizes: Mapping[str, Mapping[str, float]], k: int) -> list[str]:
    """Move groups ordered by the table's largest |cost change| of a neighbour move, largest first.

    Under a time limit the groups whose moves the table deems most consequential are measured first.
    """
    cost = table.df.set_index(["unit", "option"])["cost"]

    def swing(g: str) -> float:
        cur = current[groups[g][0]]
        return max((abs(sum(float(cost[(u, o)]) - float(cost[(u, cur)]) for u in groups[g]))
                    for o in neighbour_options(sizes[g], cur, k)), default=0.0)
    return sorted(groups, key=lambda g: (-swing(g), g))


def _measure_moves(meter: _Meter, weights: _Weights, groups: Mapping[str, Sequence[str]],
                   current: Mapping[str, str], sizes: Mapping[str, Mapping[str, float]],
                   starts: Mapping[str, int], error: float, k: int, order: Sequence[str],
                   deadline: float | None) -> dict[str, dict[str, float]]:
    """Δ_g(o) = D(P with group g → o) − D(P) for the neighbour options of every move group.

    Groups are measured in ``order``; past ``deadline`` the rest keep only their current option.
    """
    deltas: dict[str, dict[str, float]] = {}
    for g in order:
        members = groups[g]
        cur = current[members[0]]
        deltas[g] = {cur: 0.0}
        if deadline is not None and time.perf_counter() > deadline:
            continue
        for o in neighbour_options(sizes[g], cur, k):
            for u in members:
                weights.set(u, o)
            try:
                deltas[g][o] = meter.error_from(starts[g]) - error
            finally:
                for u in members:
                    weights.set(u, cur)
    return deltas


def _local_table(table: CostTable, groups: Mapping[str, Sequence[str]],
                 deltas: Mapping[str, Mapping[str, float]]) -> CostTable:
    """The table restricted to measured moves; a group's Δ (shifted to min 0) sits on its first unit."""
    first = {members[0]: g for g, members in groups.items()}
    group_of = {u: g for g, members in groups.items() for u in members}
    df = table.df
    keep = np.array([o in deltas[group_of[u]] for u, o in zip(df["unit"], df["option"], strict=True)])
    sub = df.loc[keep].copy()
    shift = {g: min(d.values()) for g, d in deltas.items()}
    sub["cost"] = [deltas[first[u]][o] - shift[first[u]] if u in first else 0.0
                   for u, o in zip(sub["unit"], sub["option"], strict=True)]
    sub = sub.drop(columns=[c for c in ("cost_std",) if c in sub.columns])
    return CostTable(sub.reset_index(drop=True), {**dict(table.metadata), "estimator": "refine"})
