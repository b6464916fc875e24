"""Quantizable units of a torch model: discovery, tie groups from runtime fusion, weight access.

A unit is a module's weight (``model.layers.0.mlp.down_proj``) or a group of its input columns
(``model.layers.0.mlp.down_proj[g=3]``, columns ``3·G … 4·G−1``), as SliM-LLM allocates.
Weights are always read [out, in] (:func:`weight_view`), so a GPT-2 ``Conv1D``, stored [in, out],
is a linear unit like any other.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from allocator.core.errors import InvalidParameterError, ModelError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_FUSION",
    "Unit",
    "UnitKind",
    "discover_units",
    "get_module",
    "is_linear_like",
    "stores_transposed",
    "unit_weight",
    "weight_view",
]


class UnitKind(StrEnum):
    LINEAR = "linear"
    CONV = "conv"
    EMBEDDING = "embedding"


#: Runtime fusions (vLLM, llama.cpp, TensorRT-LLM): members must share one setting.
#: regex on the module name → fused name template (``\1`` = the block prefix).
DEFAULT_FUSION: Mapping[str, str] = {
    r"^(.*)\.self_attn\.(?:q|k|v)_proj$": r"\1.self_attn.qkv_proj",
    r"^(.*)\.mlp\.(?:gate|up)_proj$": r"\1.mlp.gate_up_proj",
    r"^(.*)\.(?:w1|w3)$": r"\1.w13",
}


@dataclass(frozen=True, kw_only=True)
class Unit:
    """One quantizable thing; ``columns`` is the [start, stop) input-column range of a group."""

    name: str
    module: str
    kind: UnitKind
    shape: tuple[int, ...]
    params: int
    in_features: int
    columns: tuple[int, int] | None = None
    tie: str | None = None
    #: the module stores its weight [in, out] (transformers' ``Conv1D``); ``shape`` is [out, in]
    transposed: bool = False


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"model has no module {name!r}; check the unit names") from None


def stores_transposed(module: torch.nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2, DistilGPT2, OpenAI GPT) computes ``x @ W + b``, W [in, out].

    Matched by class name and its ``nf`` attribute, so models whose remote code copies the class
    are covered too, and the core needs no transformers import.
    """
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(w, "ndim", 0) == 2


def is_linear_like(module: torch.nn.Module) -> bool:
    """``nn.Linear`` or a transposed-storage ``Conv1D``: a matmul on the last input dimension."""
    import torch

    return isinstance(module, torch.nn.Linear) or stores_transposed(module)


def weight_view(module: torch.nn.Module, name: str = "") -> torch.Tensor:
    """The module's weight laid out [out, in, ...] as nn.Linear / ConvNd store it.

    A view, so in-place writes reach the parameter (Conv1D's [in, out] weight is transposed).

    Raises:
        ModelError: the module has no weight tensor.
    """
    import torch

    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise ModelError(f"module {name!r} has no weight tensor")
    return w.t() if stores_transposed(module) else w


def unit_weight(model: torch.nn.Module, unit: Unit) -> torch.Tensor:
    """The unit's weight as a 2-D view [out, in] (conv flattened; a group is a column slice)."""
    w = weight_view(get_module(model, unit.module), unit.module)
    w2 = w.reshape(w.shape[0], -1) if w.dim() > 2 else w
    if unit.columns is None:
        return w2
    lo, hi = unit.columns
    return w2[:, lo:hi]


def _kind_of(module: torch.nn.Module, kinds: Sequence[UnitKind]) -> UnitKind | None:
    import torch

    if UnitKind.LINEAR in kinds and is_linear_like(module):
        return UnitKind.LINEAR
    if UnitKind.CONV in kinds and isinstance(module, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d):
        return UnitKind.CONV
    if UnitKind.EMBEDDING in kinds and isinstance(module, torch.nn.Embedding):
        return UnitKind.EMBEDDING
    return None


def _fused_name(name: str, fusion: Mapping[str, str]) -> str | None:
    for pattern, template in fusion.items():
        if re.match(pattern, name):
            return re.sub(pattern, template, name)
    return None


def _compile(pattern: str | None, flag: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InvalidParameterError(f"{flag} regex {pattern!r} is invalid: {exc}") from None


def discover_units(
    model: torch.nn.Module,
    *,
    include: str | None = None,
    exclude: str | None = None,
    kinds: Sequence[UnitKind | str] = (UnitKind.LINEAR,),
    group_columns: int | None = None,
    fusion: Mapping[str, str] | None = DEFAULT_FUSION,
) -> list[Unit]:
    """Find the units of ``model``.

    Args:
        include / exclude: regexes searched in module names (``re.search``).
        kinds: module kinds to take (linear by default; conv and embedding on request).
        group_columns: split each weight into groups of this many input columns.
        fusion: regex → fused-name map; modules that fuse to the same name (with ≥ 2 members
            found) get one tie id. ``None`` disables ties.

    Raises:
        ModelError: nothing matches (names the filters so the user can fix them).
    """
    kind_set = [UnitKind(k) for k in kinds]
    inc, exc = _compile(include, "--include"), _compile(exclude, "--exclude")
    if group_columns is not None and group_columns <= 0:
        raise InvalidParameterError(f"group_columns must be > 0, got {group_columns}")
    found: list[tuple[str, UnitKind, tuple[int, ...], bool]] = []
    n_candidates = 0
    for name, module in model.named_modules():
        kind = _kind_of(module, kind_set)
        if kind is None or getattr(module, "weight", None) is None:
            continue
        n_candidates += 1
        if (inc and not inc.search(name)) or (exc and exc.search(name)):
            continue
        found.append((name, kind, tuple(weight_view(module, name).shape), stores_transposed(module)))
    if not found:
        what = "/".join(kind_set)
        if n_candidates == 0:
            raise ModelError(f"model has no {what} modules to quantize; pass kinds=... (conv, embedding)")
        raise ModelError(
            f"no {what} module matches include={include!r} exclude={exclude!r} "
            f"({n_candidates} candidates); loosen the regexes"
        )
    fused = {n: _fused_name(n, fusion) if fusion else None for n, *_ in found}
    sizes: dict[str, int] = {}
    for f in fused.values():
        if f is not None:
            sizes[f] = sizes.get(f, 0) + 1
    units: list[Unit] = []
    for name, kind, shape, transposed in found:
        f_name = fused[name]
        tie = f_name if f_name is not None and sizes[f_name] > 1 else None
        out_f = shape[0]
        in_f = 1
        for d in shape[1:]:
            in_f *= d
        if group_columns is None or group_columns >= in_f:
            units.append(Unit(name=name, module=name, kind=kind, shape=shape, params=out_f * in_f,
                              in_features=in_f, tie=tie, transposed=transposed))
            continue
        for gi, lo in enumerate(range(0, in_f, group_columns)):
            hi = min(lo + group_columns, in_f)
            units.append(Unit(
                name=f"{name}[g={gi}]", module=name, kind=kind, shape=shape,
                params=out_f * (hi - lo), in_features=hi - lo, columns=(lo, hi),
                tie=f"{tie}[g={gi}]" if tie else None, transposed=transposed,
            ))
    return units
