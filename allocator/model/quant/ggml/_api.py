"""``quantize`` / ``dequantize``: the public entry points (checks, dispatch, GGUF byte shapes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from allocator.core.errors import InvalidParameterError
from allocator.model.quant.ggml._iq4nl import dequantize_iq4_nl, quantize_iq4_nl
from allocator.model.quant.ggml._k_high import (
    dequantize_q6_K,
    dequantize_q45_K,
    quantize_q6_K,
    quantize_q45_K,
)
from allocator.model.quant.ggml._k_low import dequantize_q2_K, dequantize_q3_K, quantize_q2_K, quantize_q3_K
from allocator.model.quant.ggml._legacy import dequantize_legacy, quantize_legacy
from allocator.model.quant.ggml._ops import seq_sum
from allocator.model.quant.ggml._types import GgmlBlock, block_of

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["GgmlQuantized", "dequantize", "quantize"]

_LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
#: Weights per chunk: the searches' [block, N] temporaries stay in cache.
_CHUNK = 1 << 16


@dataclass(frozen=True, kw_only=True)
class GgmlQuantized:
    """A tensor quantized by ggml's algorithm: its GGUF bytes and what they dequantize to."""

    ggml_type: str
    #: float32 tensor of the weight's shape: ggml's ``dequantize_row_<type>`` of ``data``.
    values: torch.Tensor
    #: uint8 array, shape ``(*shape[:-1], shape[-1] / block · block_bytes)`` (gguf-py's byte shape).
    data: np.ndarray

    @property
    def bits_per_weight(self) -> float:
        return block_of(self.ggml_type).bits_per_weight


def _check_weight(weight: torch.Tensor, spec: GgmlBlock) -> np.ndarray:
    import numpy as np
    import torch

    if not isinstance(weight, torch.Tensor) or weight.ndim < 1 or weight.numel() == 0:
        raise InvalidParameterError(
            f"weight must be a non-empty torch.Tensor [rows, cols], got {type(weight).__name__}"
            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else ''}"
        )
    cols = weight.shape[-1]
    if cols % spec.block:
        raise InvalidParameterError(
            f"{spec.name} needs rows whose length is a multiple of {spec.block}, got {cols}; "
            f"use a {'32-weight type such as iq4_nl or q8_0' if spec.block == 256 else 'padded row'}"
        )
    x = weight.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    if not bool(np.isfinite(x).all()):
        raise InvalidParameterError(
            f"weight has non-finite values; ggml quantizes finite weights only ({spec.name})"
        )
    return x.reshape(-1, cols)


def _check_importance(importance: torch.Tensor | None, cols: int) -> np.ndarray | None:
    import numpy as np
    import torch

    if importance is None:
        return None
    qw = torch.as_tensor(importance).detach().to(device="cpu", dtype=torch.float32).reshape(-1).numpy()
    if qw.size != cols:
        raise InvalidParameterError(
            f"importance has {qw.size} values; pass one per input column ({cols}), as an imatrix entry"
        )
    if not bool(np.isfinite(qw).all()):
        raise InvalidParameterError("importance has non-finite values; pass finite per-column weights")
    return qw


def _row_sigma2(x: np.ndarray) -> np.ndarray:
    """σ² = Σx²/n_per_row per row, summed in C's order (``quantize_row_q4_0_impl`` …)."""
    import numpy as np

    return seq_sum(np.ascontiguousarray((x * x).T)) / np.float32(x.shape[1])


def _quantize_chunk(blocks: np.ndarray, name: str, qw_b: np.ndarray | None) -> np.ndarray:
    """Block-major blocks [N, block] (and per-weight importance) → block bytes [N, block_bytes]."""
    import numpy as np

    if name in _LEGACY or name == "iq4_nl":
        em = np.ascontiguousarray(blocks.T)  # element-major, see _ops
        qw_em = None if qw_b is None else np.ascontiguousarray(qw_b.T)
        return quantize_iq4_nl(em, qw_em) if name == "iq4_nl" else quantize_legacy(em, name, qw_em)
    if name == "q2_K":
        return quantize_q2_K(blocks, qw_b)
    if name == "q3_K":
        return quantize_q3_K(blocks, qw_b)
    if name == "q6_K":
        return quantize_q6_K(blocks, qw_b)
    return quantize_q45_K(blocks, qw_b, is_q5=name == "q5_K")


def _quantize_rows(x: np.ndarray, name: str, qw: np.ndarray | None, threads: int) -> np.ndarray:
    """Rows [R, C] → block bytes [R · C / block, block_bytes], in chunks of ~_CHUNK weights so the
    searches' temporaries stay in cache (blocks are independent, so chunking changes nothing);
    chunks run on ``threads`` threads (numpy releases the GIL inside its loops)."""
    import numpy as np

    rows, cols = x.shape
    spec = block_of(name)
    per_row = cols // spec.block
    blocks = x.reshape(-1, spec.block)
    sigma2 = None
    if qw is not None and name in _LEGACY and name != "q8_0":
        sigma2 = np.repeat(_row_sigma2(x), per_row)[:, None]  # w = qw·√(σ² + x²), σ² per row
    out = np.empty((blocks.shape[0], spec.block_bytes), np.uint8)
    step = max(1, _CHUNK // spec.block)

    def one(b0: int) -> None:
        chunk = blocks[b0 : b0 + step]
        qw_b = None
        if qw is not None:
            qw_b = qw.reshape(per_row, spec.block)[np.arange(b0, b0 + chunk.shape[0]) % per_row]
            if sigma2 is not None:
                qw_b = qw_b * np.sqrt(sigma2[b0 : b0 + chunk.shape[0]] + chunk * chunk)
        out[b0 : b0 + chunk.shape[0]] = _quantize_chunk(chunk, name, qw_b)

    starts = range(0, blocks.shape[0], step)
    if threads <= 1 or len(starts) <= 1:
        for b0 in starts:
            one(b0)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(threads, len(starts))) as pool:
            list(pool.map(one, starts))
    return out


def default_threads() -> int:
    """``$BITALLOC_GGML_THREADS``, else the CPU count (at most 8)."""
    import os

    env = os.environ.get("BITALLOC_GGML_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise InvalidParameterError(
                f"BITALLOC_GGML_THREADS={env!r} is not an integer; set a thread count such as 4"
            ) from None
    return max(1, min(8, os.cpu_count() or 1))


def _dequantize_blocks(data: np.ndarray, name: str) -> np.ndarray:
    if name in _LEGACY:
        return dequantize_legacy(data, name)
    if name == "iq4_nl":
        return dequantize_iq4_nl(data)
    if name == "q2_K":
        return dequantize_q2_K(data)
    if name == "q3_K":
        return dequantize_q3_K(data)
    if name == "q6_K":
        return dequantize_q6_K(data)
    return dequantize_q45_K(data, is_q5=name == "q5_K")


def quantize(
    weight: torch.Tensor,
    ggml_type: str,
    *,
    importance: torch.Tensor | None = None,
    threads: int | None = None,
) -> GgmlQuantized:
    """Quantize ``weight`` (rows along the last axis) exactly as ggml's ``quantize_<type>``.

    ``importance`` is an imatrix entry: one non-negative weight per input column (the last
    axis). With it ggml runs its ``quantize_row_<type>_impl`` search, without it the ``_ref``
    quantizer (q8_0 ignores it; iq4_nl always searches, weighting by x² without it).
    ``threads``: chunks quantized in parallel (default :func:`default_threads`); the bytes do
    not depend on it.
    """
    spec = block_of(ggml_type)
    x = _check_weight(weight, spec)
    qw = _check_importance(importance, x.shape[1])
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidParameterError(f"threads must be an int ≥ 1, got {threads!r}")
    blocks = _quantize_rows(x, spec.name, qw, default_threads() if threads is None else threads)
    import torch

    values = torch.from_numpy(_dequantize_blocks(blocks, spec.name).reshape(weight.shape))
    byte_shape = (*weight.shape[:-1], weight.shape[-1] // spec.block * spec.block_bytes)
    return GgmlQuantized(ggml_type=spec.name, values=values, data=blocks.reshape(byte_shape))


def dequantize(data: np.ndarray, ggml_type: str, shape: tuple[int, ...]) -> torch.Tensor:
    """GGUF bytes of ``ggml_type`` → float32 weights of ``shape`` (ggml's ``dequantize_row_*``)."""
    import numpy as np
    import torch

    spec = block_of(ggml_type)
    n = int(np.prod(shape))
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if n % spec.block or raw.size != n // spec.block * spec.block_bytes:
        raise InvalidParameterError(
            f"{raw.size} bytes do not hold a {spec.name} tensor of shape {tuple(shape)} "
            f"({n // spec.block * spec.block_bytes} bytes); pass the matching shape"
        )
    blocks = raw.reshape(-1, spec.block_bytes)
    return torch.from_numpy(_dequantize_blocks(blocks, spec.name).reshape(shape))
