"""Weight matrices that stress ggml's quantizers: random rows and adversarial ones."""

from __future__ import annotations

import torch


def adversarial_rows(cols: int, *, seed: int = 0) -> torch.Tensor:
    """One row per hazard: zeros, ±0, constants, tiny values, outliers, one sign only, sparse,
    half-zero super-blocks, ties of |max|, huge magnitudes and plain Gaussian rows."""
    g = torch.Generator().manual_seed(seed)
    randn = torch.randn(cols, generator=g)
    rows = [
        torch.zeros(cols),
        torch.where(torch.arange(cols) % 2 == 0, torch.tensor(-0.0), torch.tensor(0.0)),
        torch.full((cols,), 0.37),
        torch.full((cols,), -1.25),
        randn * 1e-20,  # below GROUP_MAX_EPS
        randn * 1e-6,  # fp16-subnormal scales
        torch.where(torch.arange(cols) % 97 == 5, 40.0, 0.01 * randn),  # outliers
        -randn.abs() - 0.1,  # negative only
        randn.abs() + 0.1,  # positive only
        torch.where(torch.rand(cols, generator=g) < 0.9, 0.0, randn),  # sparse
        torch.where((torch.arange(cols) // 16) % 2 == 0, 0.0, randn),  # zero sub-blocks
        torch.where(torch.arange(cols) % 2 == 0, 1.0, -1.0),  # |max| ties of both signs
        randn * 3e3,
        torch.round(randn * 4) / 4,  # already on a grid
    ]
    return torch.stack(rows)


def weights_and_importance(cols: int, *, rows: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Adversarial rows plus Gaussian ones, and an imatrix-like importance with zero columns."""
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.cat([adversarial_rows(cols, seed=seed), torch.randn(rows, cols, generator=g)])
    imp = torch.rand(cols, generator=g) ** 2 * 5
    imp[torch.randperm(cols, generator=g)[: cols // 8]] = 0.0
    return w, imp
