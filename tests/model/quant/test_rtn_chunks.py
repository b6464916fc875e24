"""RTN of a large weight in row blocks gives the values of RTN in one piece (groups lie in rows)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from allocator.model.quant import rtn  # noqa: E402


@pytest.mark.parametrize(("shape", "group", "symmetric"), [
    ((301, 300), 128, False),  # a short last group, rows not a multiple of the block
    ((64, 576), 32, True),
    ((5, 7), -1, False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_row_blocks_equal_one_piece(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int],
                                    group: int, symmetric: bool, dtype: torch.dtype) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    monkeypatch.setattr(rtn, "CHUNK_ELEMENTS", 10**12)
    whole = rtn.fake_quantize_int(w, bits=3, group_size=group, symmetric=symmetric)
    monkeypatch.setattr(rtn, "CHUNK_ELEMENTS", 1000)  # blocks of a few rows
    blocks = rtn.fake_quantize_int(w, bits=3, group_size=group, symmetric=symmetric)
    assert blocks.dtype == dtype and torch.equal(blocks, whole)
    assert not torch.equal(whole, w)  # it did quantize
