"""The per-(sample, probe) terms ``r(g)`` the estimators average: the Gauss–Newton quadratic
form ``½ ⟨ΔW, g⟩²`` (and its linear part, for units measured in row pieces), the diagonal
``½ Σ g² ΔW²`` and the trace ``‖g‖²`` (package doc).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["gn_diagonal_terms", "gn_inner_products", "gn_quadratic_terms", "gn_row_terms", "gn_square",
           "gn_trace_terms"]


def gn_quadratic_terms(g: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``½ ⟨ΔW_o, g⟩²`` per option o: ``g`` [out, cols], ``delta`` [options, out, cols].

    With ``g = Jᵀ v`` and ``E[v vᵀ] = H_D``, ``E ½ ⟨ΔW, g⟩² = ½ ΔWᵀ Jᵀ H_D J ΔW`` (the exact GN
    form of the unit block, within-unit correlations included)."""
    return gn_square(gn_inner_products(g, delta))


def gn_inner_products(g: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``⟨ΔW_o, g⟩`` per option o (float64): linear in the weights, so a unit's value is the sum
    over any split of its rows — what :func:`~sensitivity._curvature.passes.curvature_in_passes`
    uses for a unit whose deltas alone exceed the budget."""
    return (delta.reshape(delta.shape[0], -1) @ g.to(delta.dtype).reshape(-1)).double()  # gemv


def gn_square(inner: torch.Tensor) -> torch.Tensor:
    """``½ x²``: :func:`gn_quadratic_terms` from its summed :func:`gn_inner_products`."""
    return 0.5 * inner**2


def gn_row_terms(g: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``½ Σ_r ⟨ΔW_{o,r}, g_r⟩²`` per option o, over the unit's output rows r: ``g`` [out, cols],
    ``delta`` [options, out, cols].

    ``E ½ Σ_r ⟨ΔW_r, g_r⟩² = ½ Σ_r ΔW_r GN_{rr} ΔW_rᵀ``: the GN form with its row blocks only.
    Each row block keeps the input-side correlations (``GN_rr = E[g_r g_rᵀ]``,
    ``g_r = Σ_t δ_{t,r} x_t``: the correlations GPTQ's ``X Xᵀ`` describes, weighted by the row's
    output sensitivity); the cross-row terms it drops have mean zero over rounding errors that
    are independent between rows (RTN, k-quants and GPTQ all quantize each row alone), while in
    :func:`gn_quadratic_terms` they are
    ``out² − out`` products of mean about zero added to every (sample, probe) term: their noise
    is gone here (how much that is depends on how independently the rows' projections vary;
    docs/ranking.md measures it). Sums over any split of the rows (no finishing step), but not
    over two paths of one gradient."""
    import torch

    # a batched gemv over the rows: no [out, cols] temporary per option (a product-then-sum
    # loop took twice the time, most of it allocating)
    inner = torch.einsum("orc,rc->or", delta, g.to(delta.dtype)).double()
    return 0.5 * inner.square().sum(-1)


def gn_diagonal_terms(g: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
    """``½ Σ_j g_j² ΔW_{o,j}²`` per option o: ``E[g_j²] = GN_jj`` (true-Fisher diagonal)."""
    g2 = g.to(delta_sq.dtype).reshape(-1) ** 2
    return 0.5 * (delta_sq.reshape(delta_sq.shape[0], -1) @ g2).double()


def gn_trace_terms(g: torch.Tensor) -> torch.Tensor:
    """``‖g_u‖²`` (shape [1]): ``E‖g_u‖² = Tr(Jᵀ H_D J)_u = Tr(GN_u)``, never negative.

    Summed over blocks of rows: a float64 copy of a whole 32000 × 2048 head gradient and its
    square are 1 GB."""
    import torch

    flat = g.reshape(g.shape[0], -1)
    rows = max(1, _BLOCK_ELEMENTS // max(1, flat.shape[1]))
    total = torch.zeros((), dtype=torch.float64, device=g.device)
    for i in range(0, flat.shape[0], rows):
        total += flat[i:i + rows].double().square_().sum()
    return total.reshape(1)


#: float64 elements per block of rows in :func:`gn_trace_terms` (32 MiB)
_BLOCK_ELEMENTS = 1 << 22
