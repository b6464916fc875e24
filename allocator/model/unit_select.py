"""Which discovered units go into the budget: the user's ``--include/--exclude`` globs, and
units whose output cannot reach the measured output (``inert_units``).

One pattern syntax everywhere (``bitalloc run`` / ``demo`` / ``estimate``, ``EstimateSpec``,
``RunConfig``, the service's ``estimate`` job): shell globs (:func:`fnmatch.fnmatchcase`, ``*``
also matches dots) matched against a unit's full name or any of its parent modules, so
``'pooler'`` selects ``pooler.dense`` and ``'model.layers.0'`` the whole first block (but not
``model.layers.10``). A column-group unit ``m[g=3]`` is matched by its module ``m``. Patterns
written for the old regex syntax of ``estimate`` (they hold ``\\ ^ $ | ( ) + {``, which never
occur in a module name, so they cannot be meant as globs) still work for now: they are searched
in the module name as before (:func:`re.search`) with a :class:`FutureWarning` that shows the
glob to write instead.

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

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError, ModelError
from allocator.core.units import discover_units, get_module
from allocator.model.loading import model_forward_outputs
from allocator.model.outputs import probe_batch

if TYPE_CHECKING:
    from allocator.core.units import Unit
    from allocator.model.loading import LoadedModel

__all__ = ["NoUnitMatchedError", "UnitSelection", "check_patterns", "filter_units", "inert_units",
           "select_units", "unit_matches"]

REASON_INCLUDE = "not matched by --include"
REASON_EXCLUDE = "matched by --exclude"
REASON_INERT = "cannot affect the output (kept at full precision)"

#: characters of regex syntax that never occur in a module name: a pattern holding one cannot
#: be a glob that matches anything, so it is read as a pattern of the old regex syntax
_REGEX_ONLY = frozenset("\\^$|()+{}")


class NoUnitMatchedError(InvalidParameterError, ModelError):
    """A pattern matches no unit, or the patterns leave none: a bad parameter (``except
    InvalidParameterError``) that only this model shows (``except ModelError``, as the regex
    filters of ``estimate`` raised before)."""


@dataclass(frozen=True, kw_only=True)
class UnitSelection:
    """The units in the budget and the ones left out, each with why."""

    units: tuple[Unit, ...]
    excluded: Mapping[str, str] = field(default_factory=dict)

    def by_reason(self, reason: str) -> list[str]:
        return [u for u, r in self.excluded.items() if r == reason]


def is_legacy_regex(pattern: str) -> bool:
    """Whether ``pattern`` holds regex-only syntax (see the module docstring)."""
    return any(c in _REGEX_ONLY for c in pattern)


def _glob_hint(pattern: str) -> str:
    """A best-effort glob for a simple regex (``layer\\.0\\.`` → ``*layer.0.*``), for the warning."""
    body = pattern.removeprefix("^").removesuffix("$")
    body = body.replace(".*", "*").replace("\\.", ".")
    if not pattern.startswith("^"):
        body = "*" + body.lstrip("*")
    if not pattern.endswith("$"):
        body = body.rstrip("*") + "*"
    return body


def check_patterns(patterns: str | Iterable[str] | None, flag: str) -> tuple[str, ...]:
    """``patterns`` as a tuple of glob patterns: None → ``()``, one string → one pattern.

    Raises:
        InvalidParameterError: a pattern is not a non-empty string, or is a malformed regex of
            the old syntax.
    """
    if patterns is None:
        return ()
    out = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    for p in out:
        if not isinstance(p, str) or not p.strip():
            raise InvalidParameterError(f"{flag} takes non-empty glob patterns such as "
                                        f"'model.layers.0.*', got {p!r}")
        if is_legacy_regex(p):
            try:
                re.compile(p)
            except re.error as exc:
                raise InvalidParameterError(
                    f"{flag} {p!r} is neither a glob nor a valid regex ({exc}); write a glob "
                    f"such as {_glob_hint(p)!r}") from None
    return out


def _warn_legacy(patterns: Sequence[str], flag: str) -> None:
    for p in patterns:
        if is_legacy_regex(p):
            # FutureWarning, not DeprecationWarning: the person typing the pattern should see it
            # quoted by hand: repr would double every backslash of the regex
            warnings.warn(f"{flag} '{p}' is a regex; unit patterns are globs now (as in "
                          f"'bitalloc run'); regexes are still searched in module names for now, "
                          f"write e.g. '{_glob_hint(p)}' instead", FutureWarning, stacklevel=3)


def unit_matches(unit: Unit, pattern: str) -> bool:
    """Whether ``pattern`` selects ``unit``: a glob on its name, its module or a parent module;
    a pattern of the old regex syntax searched in its module name."""
    if is_legacy_regex(pattern):
        return re.search(pattern, unit.module) is not None
    if fnmatchcase(unit.name, pattern):
        return True
    parts = unit.module.split(".")
    return any(fnmatchcase(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


def _matches(unit: Unit, patterns: Sequence[str]) -> bool:
    return any(unit_matches(unit, p) for p in patterns)


def _drop_lone_ties(units: Sequence[Unit]) -> tuple[Unit, ...]:
    """A tie group with one member left constrains nothing; clear it, as discovering only the
    kept modules would have (a tie id naming absent partners would confuse the solvers' checks)."""
    count: dict[str, int] = {}
    for u in units:
        if u.tie is not None:
            count[u.tie] = count.get(u.tie, 0) + 1
    return tuple(replace(u, tie=None) if u.tie is not None and count[u.tie] < 2 else u
                 for u in units)


def filter_units(units: Sequence[Unit], include: str | Iterable[str] | None = (),
                 exclude: str | Iterable[str] | None = ()) -> UnitSelection:
    """Keep units matched by one of ``include`` (all when empty) and by none of ``exclude``
    (:func:`unit_matches`), e.g. ``'*.attention.*'``, ``'pooler'``, ``'model.layers.0.*'``.

    Raises:
        NoUnitMatchedError: a pattern matches no unit (a typo would silently do nothing), or
            nothing is left.
        InvalidParameterError: a malformed pattern.
    """
    inc, exc = check_patterns(include, "--include"), check_patterns(exclude, "--exclude")
    _warn_legacy(inc, "--include")
    _warn_legacy(exc, "--exclude")
    for flag, pats in (("--include", inc), ("--exclude", exc)):
        for p in pats:
            if not any(unit_matches(u, p) for u in units):
                example = units[0].name if units else "?"
                # "matches include=..." is the wording of the old regex filters, kept for callers
                # that look for it
                raise NoUnitMatchedError(
                    f"{flag} {p!r} matches no unit (nothing matches {flag[2:]}={p!r} among "
                    f"{len(units)}); unit names look like {example!r} (glob: '*' matches any "
                    f"text, dots included; a module selects everything under it)")
    kept: list[Unit] = []
    excluded: dict[str, str] = {}
    for u in units:
        if inc and not _matches(u, inc):
            excluded[u.name] = REASON_INCLUDE
        elif exc and _matches(u, exc):
            excluded[u.name] = REASON_EXCLUDE
        else:
            kept.append(u)
    if not kept:
        raise NoUnitMatchedError(
            f"--include {list(inc)} / --exclude {list(exc)} leave no unit of {len(units)}; "
            f"loosen the patterns")
    out = _drop_lone_ties(kept) if excluded else tuple(kept)
    return UnitSelection(units=out, excluded=excluded)


def inert_units(loaded: LoadedModel, batch: Mapping[str, Any],
                units: Sequence[Unit] | None = None) -> list[str]:
    """Names of the units (of ``units``; default: all linear units) whose module output cannot
    reach the measured output of ``loaded`` on ``batch`` (see the module docstring)."""
    import torch

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

    # reachability is structural: one short sample tells as much as the whole batch
    small = probe_batch(batch)
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
