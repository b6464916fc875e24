"""Which discovered units go into the budget: the user's ``--include/--exclude`` globs, and
units whose output cannot reach the measured output (``inert_units``).

A BERT encoder loaded with ``AutoModel`` runs its ``pooler.dense`` on every forward, but a
sentence-transformers model mean-pools the last hidden state: the pooler's output is thrown away.
Counting it in the budget wastes bits on nothing (the solver gives it the fewest bits, which
looks like a finding and is not). ``inert_units`` finds such units structurally, with one
forward and one autograd query: a forward hook replaces each unit module's output ``y_m`` by
``y_m + z_m`` with ``z_m`` a zero leaf tensor that requires grad (same values, and the graph
through ``y_m`` intact), and ``torch.autograd.grad(F(x), {z_m}, allow_unused=True)`` returns
``None`` exactly for the leaves the measured output ``F(x)``
(:func:`allocator.model.loading.model_forward_outputs`) does not depend on.
A module the forward never calls is inert too. No weight is changed.

torch is imported inside the functions (``import allocator`` stays light).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError, ModelError

if TYPE_CHECKING:
    from allocator.core.units import Unit
    from allocator.model.loading import LoadedModel

__all__ = ["UnitSelection", "inert_units", "select_units"]

REASON_INCLUDE = "not matched by --include"
REASON_EXCLUDE = "matched by --exclude"
REASON_INERT = "cannot affect the output (kept at full precision)"


@dataclass(frozen=True, kw_only=True)
class UnitSelection:
    """The units in the budget and the ones left out, each with why."""

    units: tuple[Unit, ...]
    excluded: Mapping[str, str] = field(default_factory=dict)

    def by_reason(self, reason: str) -> list[str]:
        return [u for u, r in self.excluded.items() if r == reason]


def _check_patterns(patterns: Iterable[str], flag: str) -> tuple[str, ...]:
    out = tuple(patterns)
    for p in out:
        if not isinstance(p, str) or not p.strip():
            raise InvalidParameterError(f"{flag} takes non-empty glob patterns, got {p!r}")
    return out


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def filter_units(units: Sequence[Unit], include: Iterable[str] = (),
                 exclude: Iterable[str] = ()) -> UnitSelection:
    """Keep units whose name matches one of ``include`` (all when empty) and none of ``exclude``.

    Patterns are shell globs on unit names (:func:`fnmatch.fnmatchcase`: ``*`` also matches
    dots), e.g. ``'*.attention.*'``, ``'pooler.*'``, ``'model.layers.0.*'``.

    Raises:
        InvalidParameterError: a pattern matches no unit (a typo would silently do nothing), or
            nothing is left.
    """
    inc, exc = _check_patterns(include, "--include"), _check_patterns(exclude, "--exclude")
    names = [u.name for u in units]
    for flag, pats in (("--include", inc), ("--exclude", exc)):
        for p in pats:
            if not any(fnmatchcase(n, p) for n in names):
                example = names[0] if names else "?"
                raise InvalidParameterError(
                    f"{flag} {p!r} matches no unit; unit names look like {example!r} "
                    f"(glob: '*' matches any text, dots included)")
    kept: list[Unit] = []
    excluded: dict[str, str] = {}
    for u in units:
        if inc and not _matches(u.name, inc):
            excluded[u.name] = REASON_INCLUDE
        elif exc and _matches(u.name, exc):
            excluded[u.name] = REASON_EXCLUDE
        else:
            kept.append(u)
    if not kept:
        raise InvalidParameterError(
            f"--include {list(inc)} / --exclude {list(exc)} leave no unit of {len(units)}; "
            f"loosen the patterns")
    return UnitSelection(units=tuple(kept), excluded=excluded)


def inert_units(loaded: LoadedModel, batch: Mapping[str, Any],
                units: Sequence[Unit] | None = None) -> list[str]:
    """Names of the units (of ``units``; default: all linear units) whose module output cannot
    reach the measured output of ``loaded`` on ``batch`` (see the module docstring)."""
    import torch

    from allocator.core.units import discover_units, get_module
    from allocator.model.loading import model_forward_outputs

    model = loaded.model
    units = list(units) if units is not None else discover_units(model)
    modules = sorted({u.module for u in units})
    leaves: dict[str, torch.Tensor] = {}
    called: set[str] = set()

    def hook(name: str) -> Any:
        def swap(_mod: torch.nn.Module, _inp: Any, out: Any) -> Any:
            called.add(name)
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None  # not a float tensor: cannot tell, keep the unit
            # y + 0 with the 0 a leaf: d F / d leaf = d F / d y, and the path through y stays
            # intact for the units upstream (a detached copy of y would cut it)
            leaf = torch.zeros_like(out, requires_grad=True)
            leaves[name] = leaf
            return out + leaf
        return swap

    # reachability is structural: two samples tell as much as the whole batch, for less memory
    small = {k: v[:2] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
             for k, v in dict(batch).items()}
    handles = [get_module(model, m).register_forward_hook(hook(m)) for m in modules]
    try:
        with torch.enable_grad():
            out = model_forward_outputs(loaded, small)
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                raise ModelError(f"model {loaded.name!r}: its measured output does not depend on "
                                 f"any unit; cannot tell inert units apart")
            names = list(leaves)
            grads = torch.autograd.grad(out.float().sum(), [leaves[n] for n in names],
                                        allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    reached = {n for n, g in zip(names, grads, strict=True) if g is not None}
    dead = (set(modules) - called) | (set(leaves) - reached)  # never run, or run for nothing
    return [u.name for u in units if u.module in dead]


def select_units(loaded: LoadedModel, units: Sequence[Unit], *, include: Iterable[str] = (),
                 exclude: Iterable[str] = (), batch: Mapping[str, Any] | None = None) -> UnitSelection:
    """``filter_units`` by the globs, then, when ``batch`` is given, leave the
    :func:`inert_units` out too (reason: cannot affect the output)."""
    chosen = filter_units(units, include, exclude)
    if batch is None:
        return chosen
    dead = set(inert_units(loaded, batch, chosen.units))
    if not dead:
        return chosen
    kept = tuple(u for u in chosen.units if u.name not in dead)
    if not kept:
        raise ModelError(f"no unit of model {loaded.name!r} affects its measured output; "
                         f"check the model kind")
    excluded = {**chosen.excluded, **{u.name: REASON_INERT for u in chosen.units if u.name in dead}}
    return UnitSelection(units=kept, excluded=excluded)
