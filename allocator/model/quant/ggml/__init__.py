"""llama.cpp's quantizers, exactly: ggml's row quantizers vectorised in numpy, GGUF bytes out.

``quantize(weight, "q4_K", importance=imatrix_column_weights)`` returns the GGUF block bytes
ggml's ``quantize_q4_K`` writes for that tensor and the float32 weights they dequantize to.
See docs/ggml-quants.md for the algorithms, the exactness guarantees and their limits.
"""

from __future__ import annotations

from allocator.model.quant.ggml._api import GgmlQuantized, dequantize, quantize
from allocator.model.quant.ggml._types import GGML_BLOCKS, GgmlBlock, block_of

#: The names :mod:`allocator.model.quant` re-exports (``quantize`` would be ambiguous there).
quantize_ggml = quantize
dequantize_ggml = dequantize

__all__ = [
    "GGML_BLOCKS",
    "GgmlBlock",
    "GgmlQuantized",
    "block_of",
    "dequantize",
    "dequantize_ggml",
    "quantize",
    "quantize_ggml",
]
