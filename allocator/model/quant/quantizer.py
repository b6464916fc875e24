"""The plan's quantizer, one contract for every stage: ``quantize(unit, W, fmt) → Q_fmt(W)``.

Costs (``sensitivity``), refinement (``allocator.jobs.refine``) and the candidate choice of
``bitalloc run`` form ``ΔW = Q_fmt(W) − W`` through a :class:`Quantizer`, so a plan is chosen with
the quantizer it will be applied with:

* :class:`RtnQuantizer` (``rtn``, the default) — round to nearest per group
  (:func:`allocator.model.quant.fake_quantize`); no data.
* :class:`~allocator.model.quant.ggml_quantizer.GgmlQuantizer` (``ggml``) — llama.cpp's exact
  quantizers for GGUF options (importance from the calibration data, like an imatrix), RTN for
  the others; the default of ``--for llamacpp`` (:func:`default_quantizer`).
* :class:`GptqQuantizer` (``gptq``) — GPTQ (:func:`allocator.model.quant.gptq.gptq_quantize`) of
  each unit alone, from the input Hessian ``H = 2XXᵀ/n`` of its module, collected once over the
  calibration batches, at full precision (:func:`gptq_quantizer`) or as the backend applies a
  reference plan (:func:`allocator.backend.gptq_quantizer_as_applied`, what ``run --method gptq``
  uses). Every
  (unit, option) result is cached, so nothing is quantized twice.

What GPTQ of one unit means here (the approximation, docs/quantizer.md):

* a layer unit is GPTQ of the whole module with the one option, from fixed inputs; the
  backend (``apply_plan(method="gptq")``) instead quantizes block by block with inputs from the
  already quantized blocks, and one module's columns may mix options. Per-unit results that do
  not depend on the other units' options are what an additive cost table and a cache need.
  Which fixed inputs matters once the model is badly damaged: on SmolLM2 at 3.25 bpw, uniform
  int3-g128 GPTQ from full-precision Hessians measured a held-out KL of 2.06 where the backend's
  block-by-block GPTQ of the same plan measured 1.63, so plans were compared against a uniform
  plan 26 % worse than the real one. From the Hessians of the uniform plan as applied
  (:func:`allocator.backend.gptq_quantizer_as_applied`) the per-unit quantizer reproduces that
  plan exactly, and
  plans near it closely (docs/quantizer.md).
* a column-group unit ``m[g=i]`` (columns [lo, hi)) is GPTQ of its column slice alone with the
  slice's Hessian block ``H[lo:hi, lo:hi]``: the minimiser of ``‖ΔW_s X_s‖²`` with every other
  column of the module at full precision — the unit's own error, compensated inside the unit.
  (Whole-module GPTQ at the unit's option, then the slice, would put into the unit's ΔW the
  compensation of other columns' errors that are not there when the unit is measured alone.)
  The backend also lets a group's error flow into the later groups of the module, so the
  applied plan's error is at most what the costs assume, up to the inputs' drift.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from allocator.core.errors import InvalidParameterError
from allocator.core.formats import QuantFormat

if TYPE_CHECKING:
    import torch

    from allocator.core.units import Unit
    from allocator.model.quant.gptq import GptqConfig

__all__ = ["DEFAULT_CACHE_BYTES", "QUANTIZERS", "GptqQuantizer", "Quantizer", "RtnQuantizer",
           "build_quantizer", "default_quantizer", "gptq_modules", "gptq_quantizer", "shared_hessians"]

#: quantizer names (``--method`` of ``bitalloc run``, ``--quantizer`` of ``bitalloc estimate``)
QUANTIZERS: tuple[str, ...] = ("rtn", "gptq", "ggml")

#: bytes of cached GPTQ results kept (least recently used dropped first): 2 GiB
DEFAULT_CACHE_BYTES = 2 << 30


@runtime_checkable
class Quantizer(Protocol):
    """``quantize(unit, weight, fmt)``: the unit's weight as ``fmt`` stores it, dequantized.

    ``weight`` is the unit's full-precision weight (:func:`allocator.core.units.unit_weight`, 2-D;
    conv weights may come flattened or not); the result has its shape and dtype and must not be
    modified in place (a quantizer may hand out a cached tensor).
    """

    name: str

    def quantize(self, unit: Unit, weight: torch.Tensor, fmt: QuantFormat) -> torch.Tensor: ...


class RtnQuantizer:
    """Round to nearest per group, :func:`allocator.model.quant.fake_quantize` (no state)."""

    name = "rtn"

    def quantize(self, unit: Unit, weight: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
        from allocator.model.quant.rtn import fake_quantize

        return fake_quantize(weight, fmt)

    def __repr__(self) -> str:
        return "RtnQuantizer()"


class GptqQuantizer:
    """GPTQ of each unit alone from its module's input Hessian (module doc), cached per
    (unit, option).

    Args:
        hessians: module name → ``H = 2XXᵀ/n`` [in, in] (float64 preferred), on the weight's device.
        config: GPTQ settings (blocksize, damping, static groups) — the backend's defaults.
        cache_bytes: bytes of results kept; past it the least recently used are dropped (and
            computed again if asked for again). None: keep everything.
        inputs: where the Hessians' inputs come from, in words (reports and ``repr``).
        reference: the plan (unit → option) whose Hessians these are, as the backend applies it
            (:func:`allocator.backend.gptq_quantizer_as_applied`): for that plan the per-unit
            results *are* the backend's weights, so it need not be applied again.

    ``computed`` counts GPTQ runs and ``hits`` cache hits, per (unit, option) in ``runs``.
    """

    name = "gptq"

    def __init__(self, hessians: Mapping[str, torch.Tensor], *, config: GptqConfig | None = None,
                 cache_bytes: int | None = DEFAULT_CACHE_BYTES, inputs: str = "full precision",
                 reference: Mapping[str, str] | None = None) -> None:
        from allocator.model.quant.gptq import GptqConfig

        if cache_bytes is not None and (isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int)
                                        or cache_bytes < 0):
            raise InvalidParameterError(f"GPTQ cache_bytes must be an int ≥ 0 or None, got {cache_bytes!r}")
        self.hessians = dict(hessians)
        self.config = config or GptqConfig()
        self.cache_bytes = cache_bytes
        self.inputs = inputs
        self.reference = None if reference is None else dict(reference)
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._held = 0
        self.computed = 0
        self.hits = 0
        self.runs: dict[tuple[str, str], int] = {}

    def __repr__(self) -> str:
        return f"GptqQuantizer({len(self.hessians)} modules, inputs {self.inputs}, {self.config})"

    def quantize(self, unit: Unit, weight: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
        key = (unit.name, fmt.name)
        got = self._cache.get(key)
        if got is not None and tuple(got.shape) == tuple(weight.shape):
            self._cache.move_to_end(key)
            self.hits += 1
            return got
        q = self._gptq(unit, weight, fmt)
        self.computed += 1
        self.runs[key] = self.runs.get(key, 0) + 1
        self._keep(key, q)
        return q

    def _gptq(self, unit: Unit, weight: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
        from allocator.model.quant.gptq import column_formats, gptq_quantize

        H = self.hessians.get(unit.module)
        if H is None:
            raise InvalidParameterError(
                f"GPTQ has no input Hessian for unit {unit.name!r} (module {unit.module!r}); "
                "GPTQ covers Linear modules only: leave it out (--exclude) or use rtn")
        w2 = weight.detach().reshape(weight.shape[0], -1)
        if unit.columns is not None and w2.shape[1] != H.shape[0]:
            lo, hi = unit.columns
            H = H[lo:hi, lo:hi]
        if w2.shape[1] != H.shape[0]:
            raise InvalidParameterError(
                f"unit {unit.name!r}: weight has {w2.shape[1]} input columns but the Hessian of "
                f"{unit.module!r} has {H.shape[0]}; was the quantizer built for this model?")
        cols = int(w2.shape[1])
        q, _ = gptq_quantize(w2, H, column_formats(cols, [(0, cols, fmt)]), self.config)
        return q.reshape(weight.shape).to(weight.dtype)

    def _keep(self, key: tuple[str, str], q: torch.Tensor) -> None:
        size = q.numel() * q.element_size()
        if self.cache_bytes is not None and size > self.cache_bytes:
            return
        self._cache[key] = q
        self._held += size
        while self.cache_bytes is not None and self._held > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._held -= old.numel() * old.element_size()

    def clear(self) -> None:
        """Drop the cached results (the Hessians stay)."""
        self._cache.clear()
        self._held = 0


def gptq_quantizer(model: torch.nn.Module, units: Sequence[Unit], batches: Sequence[Mapping[str, Any]],
                   *, kind: str, config: GptqConfig | None = None,
                   cache_bytes: int | None = DEFAULT_CACHE_BYTES) -> GptqQuantizer:
    """A :class:`GptqQuantizer` for ``units`` from one full-precision pass over ``batches``.

    Input hooks on the units' modules stream ``H`` batch by batch (padding rows skipped,
    :func:`allocator.model.quant.gptq.collect_hessians`). Modules fed the same input (q/k/v,
    gate/up) get bit-identical Hessians; they share one tensor.

    Raises:
        InvalidParameterError: no batches, or a unit whose module is not Linear-like.
    """
    from allocator.model.outputs import model_inputs
    from allocator.model.quant.gptq import collect_hessians

    modules = gptq_modules(model, units, batches)
    acc = collect_hessians(model, modules, batches, lambda b: model(**model_inputs(b, kind)))
    return GptqQuantizer(shared_hessians({m: a.H for m, a in acc.items()}), config=config,
                         cache_bytes=cache_bytes)


def gptq_modules(model: torch.nn.Module, units: Sequence[Unit],
                 batches: Sequence[Mapping[str, Any]]) -> list[str]:
    """The units' modules, in order; each must be Linear-like (GPTQ's domain), and there must
    be calibration batches (the Hessians come from the layer inputs)."""
    from allocator.core.units import get_module, is_linear_like

    if not batches:
        raise InvalidParameterError("the GPTQ quantizer needs calibration batches (its Hessians "
                                    "come from the layer inputs); pass data or use rtn")

    modules = list(dict.fromkeys(u.module for u in units))
    for name in modules:
        if not is_linear_like(get_module(model, name)):
            raise InvalidParameterError(f"GPTQ handles Linear modules only; {name!r} is not one "
                                        "(leave it out with --exclude, or use rtn)")
    return modules


def shared_hessians(hessians: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same mapping with equal Hessians (modules reading one input) as one tensor."""
    import torch

    out: dict[str, torch.Tensor] = {}
    kept: list[torch.Tensor] = []
    for name, H in hessians.items():
        same = next((k for k in kept if k.shape == H.shape and torch.equal(k, H)), None)
        if same is None:
            kept.append(H)
        out[name] = H if same is None else same
    return out


def default_quantizer(consumer: str | None) -> str:
    """The quantizer a plan for ``consumer`` is made with by default: ``ggml`` (llama.cpp's own
    quantizers) for ``llamacpp``, ``rtn`` otherwise."""
    return "ggml" if consumer == "llamacpp" else "rtn"


def build_quantizer(name: str, model: torch.nn.Module | None = None, units: Sequence[Unit] = (),
                    batches: Sequence[Mapping[str, Any]] = (), *, kind: str = "generic",
                    config: GptqConfig | None = None, importance: bool = True) -> Quantizer:
    """The quantizer called ``name`` (:data:`QUANTIZERS`) for ``units`` of ``model``.

    ``importance`` (ggml only): collect the imatrix from ``batches`` when there are any.
    """
    if name == "rtn":
        return RtnQuantizer()
    if name == "ggml":
        from allocator.model.quant.ggml_quantizer import ggml_quantizer

        return ggml_quantizer(model, units, batches, kind=kind, importance=importance)
    if name == "gptq":
        if model is None:
            raise InvalidParameterError("the GPTQ quantizer needs the model and calibration batches")
        return gptq_quantizer(model, units, batches, kind=kind, config=config)
    raise InvalidParameterError(f"quantizer {name!r} is unknown; choose one of {', '.join(QUANTIZERS)}")
