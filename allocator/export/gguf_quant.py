"""The one place the GGUF writer gets quantized bytes: :func:`ggml_quantize`.

The writer needs, for a weight [rows, cols] and a ggml type, the GGUF block bytes and the values
they dequantize to. llama.cpp's own row quantizers (``allocator.model.quant.ggml.quantize``, issue
18 item 4) provide both for every type; until they are in the build, gguf-py's numpy quantizers
(``gguf.quants.quantize``: q4_0, q4_1, q5_0, q5_1, q8_0, bf16 — the reference rounding of ggml)
stand in, and the K-quants are refused with the reason. Importance weights need the former.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from allocator.core.errors import DependencyUnavailableError, ExportError

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["GgmlQuantized", "ggml_quantize"]

#: the real quantizer's module (written in parallel; used as soon as it is importable)
_GGML_MODULE = "allocator.model.quant.ggml"


@dataclass(frozen=True, kw_only=True)
class GgmlQuantized:
    """``values``: the dequantized float32 weight [rows, cols]; ``data``: uint8 [rows, row bytes]."""

    values: torch.Tensor
    data: np.ndarray


def _has_ggml_module() -> bool:
    try:
        return importlib.util.find_spec(_GGML_MODULE) is not None
    except ModuleNotFoundError:
        return False


def ggml_quantize(weight: torch.Tensor, ggml_type: str, *, importance: torch.Tensor | None = None
                  ) -> GgmlQuantized:
    """Quantize ``weight`` [rows, cols] to ``ggml_type`` as llama.cpp stores it.

    Raises:
        ExportError: the type needs llama.cpp's quantizers and they are not available here.
    """
    import numpy as np

    if _has_ggml_module():
        ggml: Any = importlib.import_module(_GGML_MODULE)
        q = ggml.quantize(weight, ggml_type, importance=importance)
        data = np.ascontiguousarray(np.asarray(q.data, dtype=np.uint8)).reshape(weight.shape[0], -1)
        return GgmlQuantized(values=q.values.float(), data=data)
    return _gguf_py_quantize(weight, ggml_type, importance)


def _gguf_py_quantize(weight: torch.Tensor, ggml_type: str, importance: torch.Tensor | None) -> GgmlQuantized:
    import torch

    try:
        import gguf
        from gguf.quants import dequantize, quantize
    except ImportError:
        raise DependencyUnavailableError("writing GGUF needs gguf-py: pip install gguf") from None
    qtype = getattr(gguf.GGMLQuantizationType, ggml_type.upper(), None)
    supported = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "bf16")
    if qtype is None or ggml_type not in supported:
        raise ExportError(f"llamacpp: {ggml_type!r} needs llama.cpp's quantizers "
                          f"({_GGML_MODULE}), which this build lacks; gguf-py quantizes only "
                          f"{', '.join(supported)}")
    if importance is not None:
        raise ExportError(f"llamacpp: importance-weighted {ggml_type} needs {_GGML_MODULE}")
    w = weight.detach().to(torch.float32).contiguous().numpy()
    data = quantize(w, qtype)
    values = torch.from_numpy(dequantize(data, qtype).astype("float32")).reshape(weight.shape)
    return GgmlQuantized(values=values, data=data)
