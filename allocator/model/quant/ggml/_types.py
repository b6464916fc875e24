"""The GGUF block types this package quantizes: block length, bytes per block, bits per weight."""

from __future__ import annotations

from dataclasses import dataclass

from allocator.core.errors import UnknownNameError

__all__ = ["GGML_BLOCKS", "GgmlBlock", "block_of"]


@dataclass(frozen=True, kw_only=True)
class GgmlBlock:
    """One ggml block struct: ``block`` weights in ``block_bytes`` bytes (ggml-common.h)."""

    name: str
    block: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        """Exact storage cost, scales included: 8 · block_bytes / block (q4_K: 8·144/256 = 4.5)."""
        return 8 * self.block_bytes / self.block


#: Every type :func:`allocator.model.quant.ggml.quantize` produces, with its exact layout.
GGML_BLOCKS: dict[str, GgmlBlock] = {
    b.name: b
    for b in (
        GgmlBlock(name="q4_0", block=32, block_bytes=18),
        GgmlBlock(name="q4_1", block=32, block_bytes=20),
        GgmlBlock(name="q5_0", block=32, block_bytes=22),
        GgmlBlock(name="q5_1", block=32, block_bytes=24),
        GgmlBlock(name="q8_0", block=32, block_bytes=34),
        GgmlBlock(name="q2_K", block=256, block_bytes=84),
        GgmlBlock(name="q3_K", block=256, block_bytes=110),
        GgmlBlock(name="q4_K", block=256, block_bytes=144),
        GgmlBlock(name="q5_K", block=256, block_bytes=176),
        GgmlBlock(name="q6_K", block=256, block_bytes=210),
        GgmlBlock(name="iq4_nl", block=32, block_bytes=18),
    )
}


def block_of(ggml_type: str) -> GgmlBlock:
    """The block spec of ``ggml_type`` (case-insensitive, e.g. ``Q4_K`` → ``q4_K``)."""
    for name, spec in GGML_BLOCKS.items():
        if name.lower() == str(ggml_type).lower():
            return spec
    raise UnknownNameError(
        f"ggml_type {ggml_type!r} is not quantized here; use one of {', '.join(GGML_BLOCKS)}"
    )
