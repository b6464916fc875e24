"""The plan's quantizers, shared by the estimators, the refiner and the backend (torch, lazy).

* :mod:`.rtn` — round to nearest per group (:func:`fake_quantize`), the default;
* :mod:`.gptq` — the GPTQ algorithm (:func:`gptq_quantize`, :class:`HessianAccumulator`);
* :mod:`.ggml` — llama.cpp's own row quantizers, bit-exact, with GGUF block bytes
  (:func:`quantize_ggml`, docs/ggml-quants.md);
* :mod:`.quantizer` — the :class:`Quantizer` contract every stage forms ``Q_fmt(W)`` through, with
  :class:`RtnQuantizer` and :class:`GptqQuantizer` (docs/quantizer.md);
* :mod:`.ggml_quantizer` — :class:`GgmlQuantizer` (``ggml``): llama.cpp's quantizers for GGUF
  options, with an imatrix from the calibration data.
"""

from __future__ import annotations

from allocator.model.quant.ggml import GGML_BLOCKS, GgmlQuantized, dequantize_ggml, quantize_ggml
from allocator.model.quant.ggml_quantizer import (
    GgmlQuantizer,
    collect_importance,
    ggml_quantizer,
    ggml_values,
)
from allocator.model.quant.gptq import (
    ColumnFormats,
    GptqConfig,
    HessianAccumulator,
    collect_hessians,
    column_formats,
    gptq_quantize,
    hinv_cholesky,
)
from allocator.model.quant.quantizer import (
    DEFAULT_CACHE_BYTES,
    QUANTIZERS,
    GptqQuantizer,
    Quantizer,
    RtnQuantizer,
    build_quantizer,
    default_quantizer,
    gptq_quantizer,
)
from allocator.model.quant.rtn import (
    fake_quantize,
    fake_quantize_int,
    quant_error,
    quantize_groups,
    rtn_grid,
)

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "GGML_BLOCKS",
    "GgmlQuantized",
    "GgmlQuantizer",
    "QUANTIZERS",
    "ColumnFormats",
    "GptqConfig",
    "GptqQuantizer",
    "HessianAccumulator",
    "Quantizer",
    "RtnQuantizer",
    "build_quantizer",
    "collect_importance",
    "collect_hessians",
    "column_formats",
    "default_quantizer",
    "dequantize_ggml",
    "fake_quantize",
    "fake_quantize_int",
    "ggml_quantizer",
    "ggml_values",
    "gptq_quantize",
    "gptq_quantizer",
    "hinv_cholesky",
    "quant_error",
    "quantize_ggml",
    "quantize_groups",
    "rtn_grid",
]
