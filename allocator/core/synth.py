"""Synthetic cost tables with the shapes of real transformer layers, for solvers and benchmarks.

Unit ``k`` is projection ``k mod 7`` (q, k, v, o, gate, up, down) of layer ``k div 7`` of a
decoder with the chosen model's real dimensions, so sizes come from the format catalogue exactly
as for a real model. Costs follow the high-rate rule ``cost = s · n · 4^(−b)`` (distortion of a
b-bit uniform quantizer falls by 4× per bit) times a lognormal sensitivity ``s`` per unit and a
small lognormal noise per (unit, option); unquantized float options cost 0.

Example:
    >>> t = synth_table(n_units=14, seed=0)
    >>> t.n_units, len(t.options)
    (14, 7)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from allocator.core.errors import InvalidParameterError
from allocator.core.formats import FormatKind, QuantFormat, parse_format
from allocator.core.table import CostTable

__all__ = ["MODEL_SHAPES", "ModelShape", "synth_options", "synth_table"]


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """Dimensions of a decoder layer (Llama family layout)."""

    hidden: int
    intermediate: int
    kv_dim: int  #: output features of k_proj / v_proj (hidden for MHA, smaller with GQA)

    def projections(self) -> list[tuple[str, int, int]]:
        """(name, out_features, in_features) of the seven linear layers of one block."""
        h, f, kv = self.hidden, self.intermediate, self.kv_dim
        return [("self_attn.q_proj", h, h), ("self_attn.k_proj", kv, h),
                ("self_attn.v_proj", kv, h), ("self_attn.o_proj", h, h), ("mlp.gate_proj", f, h),
                ("mlp.up_proj", f, h), ("mlp.down_proj", h, f)]


#: Real layer dimensions (from the models' config.json).
MODEL_SHAPES: dict[str, ModelShape] = {
    "llama-7b": ModelShape(hidden=4096, intermediate=11008, kv_dim=4096),
    "llama-13b": ModelShape(hidden=5120, intermediate=13824, kv_dim=5120),
    "llama-3-8b": ModelShape(hidden=4096, intermediate=14336, kv_dim=1024),
    "qwen2.5-0.5b": ModelShape(hidden=896, intermediate=4864, kv_dim=128),
}

_TIE_OF = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
           "mlp.gate_proj": "gate_up", "mlp.up_proj": "gate_up"}


def synth_options(n_options: int = 7) -> tuple[QuantFormat, ...]:
    """``int2..int{n+1}-g128-asym`` for n ≤ 7; 8 adds ``fp16``."""
    if isinstance(n_options, bool) or not isinstance(n_options, int) or not 1 <= n_options <= 8:
        raise InvalidParameterError(
            "The 'n_options' parameter of synth_options must be an int in 1..8. "
            f"Got {n_options!r} instead.")
    labels = [f"int{b}-g128-asym" for b in range(2, 2 + min(n_options, 7))]
    if n_options == 8:
        labels.append("fp16")
    return tuple(parse_format(x) for x in labels)


def synth_table(*, n_units: int, n_options: int = 7, seed: int = 0, model: str = "llama-7b",
                options: tuple[QuantFormat, ...] | None = None, ties: bool = False,
                resources: bool = False, sigma: float = 1.0, noise: float = 0.1) -> CostTable:
    """A seeded synthetic :class:`CostTable` (see the module docstring).

    Args:
        n_units: units (projections), cycling through layers of ``model``.
        n_options: candidate count for :func:`synth_options` (ignored when ``options`` is given).
        seed: seeds sensitivities and noise; the same arguments give the same table.
        model: a key of :data:`MODEL_SHAPES`.
        options: explicit candidate formats (e.g. from :func:`allocator.core.formats.parse_options`).
        ties: tie q/k/v and gate/up of each layer (fused runtimes).
        resources: add a ``bops`` column: params × weight bits × activation bits (8; 16 for
            unquantized options) — the bit-operations of one token through the unit.
        sigma: standard deviation of log-sensitivity across units.
        noise: standard deviation of the per-(unit, option) log-noise.
    """
    if isinstance(n_units, bool) or not isinstance(n_units, int) or n_units < 1:
        raise InvalidParameterError(
            f"The 'n_units' parameter of synth_table must be an int ≥ 1. Got {n_units!r} instead.")
    if model not in MODEL_SHAPES:
        raise InvalidParameterError(
            f"The 'model' parameter of synth_table must be one of {sorted(MODEL_SHAPES)}. "
            f"Got {model!r} instead.")
    for name, v in (("sigma", sigma), ("noise", noise)):
        if not isinstance(v, int | float) or not np.isfinite(v) or v < 0:
            raise InvalidParameterError(
                f"The {name!r} parameter of synth_table must be a float ≥ 0. Got {v!r} instead.")
    fmts = options if options is not None else synth_options(n_options)
    projs = MODEL_SHAPES[model].projections()
    rng = np.random.default_rng(seed)
    k = np.arange(n_units)
    layer, proj = k // len(projs), k % len(projs)
    out_f = np.array([p[1] for p in projs])[proj]
    in_f = np.array([p[2] for p in projs])[proj]
    params = out_f.astype(np.int64) * in_f
    names = np.array([p[0] for p in projs], dtype=object)[proj]
    units = np.char.add(np.char.add("model.layers.", layer.astype(str)).astype(object),
                        "." + names.astype(str))
    # Sensitivity: lognormal per unit, with a depth trend (first and last layers matter more).
    depth = layer / max(1, int(layer.max()))
    trend = 1.0 + 2.0 * (np.exp(-8 * depth) + np.exp(-8 * (1 - depth)))
    s = rng.lognormal(0.0, sigma, n_units) * trend
    bits = np.array([f.bits for f in fmts], dtype=np.float64)
    quantized = np.array([f.kind is not FormatKind.FLOAT for f in fmts])
    eta = rng.lognormal(0.0, noise, (n_units, len(fmts)))
    cost = (s * params / 1e6)[:, None] * np.power(4.0, -bits)[None, :] * eta
    cost[:, ~quantized] = 0.0
    kw: dict[str, Any] = {}
    if ties:
        tie_of = np.array([_TIE_OF.get(p[0], "") for p in projs], dtype=object)[proj]
        kw["tie"] = [f"model.layers.{li}.{t}" if t else None
                     for li, t in zip(layer.tolist(), tie_of.tolist(), strict=True)]
    if resources:
        act = np.where(quantized, 8.0, 16.0)
        kw["resources"] = {"bops": params[:, None] * (bits * act)[None, :]}
    meta = {"estimator": "synthetic", "model": f"synthetic:{model}", "seed": seed,
            "estimator_params": {"n_units": n_units, "sigma": sigma, "noise": noise,
                                 "ties": ties, "resources": resources}}
    return CostTable.from_unit_costs(units=units.tolist(), params=params.tolist(), options=fmts,
                                     cost=cost, in_features=in_f.tolist(), metadata=meta, **kw)
