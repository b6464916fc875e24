from __future__ import annotations

import numpy as np
import pytest

from allocator import CostTable


def small_table(n: int = 8, seed: int = 0) -> CostTable:
    """A realistic little table: costs ∝ s · 4^(−b), sizes from the catalogue."""
    rng = np.random.default_rng(seed)
    bits = np.arange(2, 9)
    s = rng.lognormal(0.0, 1.0, size=n)
    cost = s[:, None] * 4.0 ** (-bits[None, :]) * rng.uniform(0.8, 1.2, size=(n, len(bits)))
    return CostTable.from_unit_costs(
        units=[f"model.layers.{i // 2}.mlp.{'up' if i % 2 else 'down'}_proj" for i in range(n)],
        params=list(rng.integers(64, 512, size=n) * 128),
        options=[f"int{b}-g128-asym" for b in bits], cost=cost,
    )


@pytest.fixture
def table() -> CostTable:
    return small_table()
