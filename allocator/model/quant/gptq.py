"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) with per-unit formats, read against the reference.

For a linear layer with weight ``W`` [rows, cols] and calibration inputs ``X`` [cols, tokens],
GPTQ minimises ‖WX − QX‖² column by column (OBQ in a fixed order):

* ``H = 2 X Xᵀ / n`` streamed over batches (:class:`HessianAccumulator`, ``add_batch``);
* dead inputs (``H_jj = 0``) get ``H_jj = 1`` and ``W_:j = 0``; damping ``H += λ·mean(diag H)·I``;
* ``U = chol(H⁻¹)ᵀ`` (upper Cholesky factor of the inverse, :func:`hinv_cholesky`);
* for column ``j``: ``q = Q(w_j)``, ``e = (w_j − q) / U_jj``, ``W_:,k −= e · U_j,k`` for k > j —
  inside blocks of ``blocksize`` columns, with the rest of the matrix updated once per block
  ("lazy batch" updates, Eq. 4 of the paper).

Per-unit formats: every column knows the format of the plan unit that covers it (a layer unit
covers all columns, a column-group unit ``m[g=i]`` its slice), so one pass over a module mixes
bit widths and group sizes. Quantization groups start at each unit's first column.

Group grids: by default *dynamic*, as in the reference — the RTN grid (``allocator.model.quant.rtn_grid``,
the shared quantizer) of a group is computed when GPTQ reaches the group's first column, from the
weights as already updated by the errors of earlier columns. Unlike the reference, which reads the
not-yet-updated outer ``W`` for columns inside the current block, we read the current values.
``static_groups=True`` computes every grid once from the original weights instead (needed when
columns are reordered; we keep the natural order, no ``act_order``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from allocator.core.errors import BackendError, InvalidParameterError
from allocator.core.formats import FormatKind, QuantFormat
from allocator.core.units import weight_view
from allocator.model.quant.inputs import stream_inputs
from allocator.model.quant.rtn import rtn_grid

if TYPE_CHECKING:
    import torch

__all__ = ["ColumnFormats", "GptqConfig", "HessianAccumulator", "collect_hessians", "column_formats",
           "gptq_quantize", "hinv_cholesky"]


@dataclass(frozen=True, kw_only=True)
class GptqConfig:
    """GPTQ settings (reference defaults: ``blocksize=128``, ``percdamp=0.01``)."""

    blocksize: int = 128
    percdamp: float = 0.01
    static_groups: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.blocksize, int) or self.blocksize <= 0:
            raise InvalidParameterError(f"GPTQ blocksize must be a positive int, got {self.blocksize!r}")
        if not 0 < self.percdamp < 1:
            raise InvalidParameterError(f"GPTQ percdamp must be in (0, 1), got {self.percdamp!r}")


class HessianAccumulator:
    """Streaming ``H = (2/n) Σ_t x_t x_tᵀ`` over the token rows of a layer's inputs.

    ``add_batch`` rescales the running mean exactly as the reference's ``GPTQ.add_batch``:
    ``H ← H·n/(n+m)``, ``n ← n+m``, ``H += (√(2/n) X)(√(2/n) X)ᵀ``.
    """

    def __init__(self, columns: int, *, device: str | torch.device = "cpu") -> None:
        import torch

        # on the layer's device: the inputs added below live there (a CPU H would not add up)
        self.H = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """Add token rows ``inp`` [..., columns] (padding already removed)."""
        x = inp.detach().reshape(-1, inp.shape[-1]).double()
        m = x.shape[0]
        if m == 0:
            return
        self.H *= self.nsamples / (self.nsamples + m)
        self.nsamples += m
        x = math.sqrt(2 / self.nsamples) * x
        self.H += x.T @ x


def hinv_cholesky(H: torch.Tensor, W: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` after zeroing dead inputs in place in ``W``.

    λ = ``percdamp`` · mean(diag H). Returns ``U`` with ``Uᵀ U = (H + λI)⁻¹``.
    """
    import torch

    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += damp
    try:
        L = torch.linalg.cholesky(H)
        # H⁻¹ = L⁻ᵀ L⁻¹ by one triangular solve (torch's cholesky_inverse is ~5× slower on CPU).
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        Linv = torch.linalg.solve_triangular(L, eye, upper=False)
        return torch.linalg.cholesky(Linv.T @ Linv, upper=True)
    except RuntimeError as exc:  # torch raises a plain RuntimeError on non-PD matrices
        raise BackendError(
            f"GPTQ: the damped Hessian is not positive definite ({exc}); raise percdamp or "
            "use more calibration data"
        ) from None


@dataclass(frozen=True, kw_only=True)
class ColumnFormats:
    """Per column ``j``: grid bits (0 = float format), symmetry and its group's [start, end)."""

    bits: Sequence[int]
    symmetric: Sequence[bool]
    group_end: Sequence[int]  #: > 0 only at the first column of a group
    float_name: Mapping[int, str]  #: column → "fp16"/"bf16" for float columns


def column_formats(cols: int, segments: Sequence[tuple[int, int, QuantFormat]]) -> ColumnFormats:
    """Lay the plan's segments ``(lo, hi, fmt)`` onto columns; every column must be covered."""
    bits = [-1] * cols
    sym = [True] * cols
    group_end = [0] * cols
    float_name: dict[int, str] = {}
    for lo, hi, fmt in segments:
        emu = fmt.emulation
        if fmt.kind is FormatKind.FLOAT or emu is None:
            for j in range(lo, hi):
                bits[j] = 0
                float_name[j] = "bf16" if fmt.name == "bf16" else "fp16"
            continue
        b, g, s = emu
        width = hi - lo if g == -1 else g
        for start in range(lo, hi, width):
            group_end[start] = min(start + width, hi)
        for j in range(lo, hi):
            bits[j], sym[j] = b, s
    if -1 in bits:
        raise BackendError(f"GPTQ: column {bits.index(-1)} of a module has no format in the plan")
    return ColumnFormats(bits=bits, symmetric=sym, group_end=group_end, float_name=float_name)


def _grid(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    return rtn_grid(w, bits=bits, symmetric=symmetric)


def _quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Q(x) = s·(clamp(round(x/s) + z, 0, maxq) − z), the reference's ``quant.quantize``."""
    import torch

    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def gptq_quantize(
    W: torch.Tensor, H: torch.Tensor, formats: ColumnFormats, config: GptqConfig | None = None
) -> tuple[torch.Tensor, float]:
    """The GPTQ weights ``Q`` (same shape/dtype as ``W``) and the summed loss ½Σ(w−q)²/U_jj².

    See the module docstring for the algorithm.
    """

    cfg = config or GptqConfig()
    with _one_thread():
        return _gptq_loop(W, H, formats, cfg)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the column loop on one thread: its ops are tiny, and intra-op thread start-up costs
    4–6× the work on a busy 2-core CPU (measured). The caller's setting is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _gptq_loop(W: torch.Tensor, H: torch.Tensor, formats: ColumnFormats,
               cfg: GptqConfig) -> tuple[torch.Tensor, float]:
    import torch

    dtype = W.dtype
    # The column loop runs in float32 as the reference does; only the inverse is in float64.
    W = W.detach().float().clone()
    rows, cols = W.shape
    U = hinv_cholesky(H.double().to(W.device), W, cfg.percdamp).float()
    Q = torch.zeros_like(W)
    losses = torch.zeros(rows, dtype=torch.float32, device=W.device)
    static: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
    if cfg.static_groups:
        for j in range(cols):
            if formats.group_end[j]:
                static[j] = _grid(W[:, j:formats.group_end[j]], formats.bits[j], formats.symmetric[j])
    grid: tuple[torch.Tensor, torch.Tensor, int] | None = None
    for i1 in range(0, cols, cfg.blocksize):
        i2 = min(i1 + cfg.blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            w = W1[:, i]
            d = U1[i, i]
            if formats.bits[j] == 0:
                low = torch.bfloat16 if formats.float_name.get(j) == "bf16" else torch.float16
                q = w.to(low).float()
            else:
                end = formats.group_end[j]
                if end:
                    grid = static[j] if cfg.static_groups else _grid(
                        torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :end - j],
                        formats.bits[j], formats.symmetric[j])
                assert grid is not None  # a group always starts before its columns
                scale, zero, maxq = grid
                q = _quantize(w.unsqueeze(1), scale, zero, maxq).flatten()
            Q[:, j] = q
            losses += (w - q) ** 2 / d**2 / 2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Q.to(dtype), float(losses.sum())


def collect_hessians(
    model: torch.nn.Module, modules: Sequence[str], batches: Sequence[Mapping[str, Any]],
    forward: Callable[[Mapping[str, Any]], Any],
) -> dict[str, HessianAccumulator]:
    """Run ``forward`` over every batch with input hooks on ``modules``; padding rows are skipped.

    The attention mask of the batch selects real tokens when the layer input is [B, T, cols].
    """
    acc: dict[str, HessianAccumulator] = {}
    for name in modules:
        w = weight_view(model.get_submodule(name), name)
        acc[name] = HessianAccumulator(int(w[0].numel()), device=w.device)
    stream_inputs(model, modules, batches, forward, lambda name, x: acc[name].add_batch(x))
    return acc
