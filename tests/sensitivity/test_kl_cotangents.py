"""The KL output cotangents after the memory change (one softmax per row shared by its probes, the
cdf freed before the cotangents, the one-hot subtracted in place) are the very numbers of the
former per-probe formula ``softmax(l) − onehot(y)``: the tables they feed do not move."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sensitivity._curvature.output_metric import kl_cotangent, row_cotangents  # noqa: E402


def _former(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The formula before the change, verbatim."""
    p = torch.softmax(logits.detach().double(), dim=-1)
    cdf = torch.cumsum(p, dim=-1)
    y = torch.searchsorted(cdf, (u.double() * cdf[..., -1]).unsqueeze(-1).contiguous())
    y = y.clamp_max(p.shape[-1] - 1)
    return p - torch.zeros_like(p).scatter_(-1, y, 1.0)


def test_kl_cotangent_is_bitwise_the_former_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(3, 7, 50, generator=gen)
    u = torch.rand(3, 7, generator=gen, dtype=torch.float64)
    assert torch.equal(kl_cotangent(logits, u), _former(logits, u))


@pytest.mark.parametrize("masked", [False, True])
def test_row_cotangents_draw_as_before(masked: bool) -> None:
    """Same generator order (probe by probe, row by row), same values, same counts."""
    out = 3 * torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    batch = {"input_ids": torch.zeros(2, 6, dtype=torch.long), **({"attention_mask": mask} if masked else {})}
    cots, counts = row_cotangents(out, batch, "causal_lm", "kl", 3, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    for row in range(2):
        for k in range(3):
            u = torch.rand((6,), generator=gen, dtype=torch.float64)
            v = _former(out[row], u)
            if masked:
                v = v * mask[row].bool().unsqueeze(-1)
            assert torch.equal(cots[row][k], v.to(out.dtype)), (row, k)
    assert counts == ([4, 6] if masked else [6, 6])
