"""Transformer-block activation cache: re-run a model from block k with blocks 0..k−1 skipped.

Quantizing a unit inside block k leaves the inputs of blocks 0..k (and so the activation entering
block k) unchanged, so a measurement only has to recompute blocks k..end plus the final
norm / head / pooling. :class:`BlockCache` records, for every calibration chunk, the output of
every block in one full-precision forward; :meth:`BlockCache.outputs_from` then calls the model
with the ``forward`` of blocks 0..k−1 replaced by "return the cached output of block k−1", so
the model's own code still prepares masks, rotary tables and the head exactly as in a normal
call. Models whose block list is not found (or whose blocks are not called once each, in order)
fall back to the full forward.

Chunks: the calibration batches are regrouped into length-sorted, right-trimmed chunks of at most
``max_tokens`` tokens (when every batch is right-padded with an ``attention_mask``), which removes
padding work and uses larger matrix products; each row remembers its original batch so that
per-batch statistics are unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError
from allocator.core.units import Unit, get_module
from allocator.model.data.batches import batch_rows
from allocator.model.output_store import OutputStore
from allocator.model.outputs import forward_outputs

if TYPE_CHECKING:
    import torch

__all__ = [
    "BLOCK_LIST_NAMES",
    "BlockCache",
    "Chunk",
    "block_stride",
    "find_blocks",
    "forward_outputs",
    "make_chunks",
]

#: Last attribute name of a transformer block list (``model.layers``, ``encoder.layer``,
#: ``transformer.h``, ``blocks``); the one with the most parameters wins.
BLOCK_LIST_NAMES: tuple[str, ...] = ("layers", "layer", "h", "blocks", "block")


@dataclass(frozen=True, kw_only=True)
class Chunk:
    """Model inputs for a group of rows; ``origin[r]`` is the calibration batch of row r."""

    batch: Mapping[str, Any]
    origin: torch.Tensor  #: [rows] int64
    mask: torch.Tensor | None  #: [rows, T] token mask for per-token outputs, else None


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The transformer block list (prefix, ModuleList), or None when no list is recognised."""
    import torch

    best: tuple[int, str, torch.nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        if name.rsplit(".", 1)[-1] not in BLOCK_LIST_NAMES:
            continue
        n = sum(p.numel() for p in mod.parameters())
        if best is None or n > best[0]:
            best = (n, name, mod)
    return None if best is None else (best[1], best[2])


def _output_mask(chunk_batch: Mapping[str, Any], out: torch.Tensor) -> torch.Tensor | None:
    """Token mask for per-token outputs ([B, T, V] logits); None for per-sample outputs."""
    import torch

    if out.dim() < 3:
        return None
    am = chunk_batch.get("attention_mask")
    if am is None or tuple(am.shape) != tuple(out.shape[:2]):
        return torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
    return am.to(out.device).bool()


def _right_padded_lengths(batch: Mapping[str, Any]) -> tuple[int, int, torch.Tensor] | None:
    """(rows, T, lengths) when every tensor is [B, ...] and the mask is right padding; else None."""
    import torch

    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    rows, t = ids.shape
    for v in batch.values():
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != rows:
            return None
    am = batch.get("attention_mask")
    if am is None:
        return rows, t, torch.full((rows,), t, dtype=torch.long, device=ids.device)
    if tuple(am.shape) != (rows, t):
        return None
    lengths = am.long().sum(1)
    expected = torch.arange(t, device=am.device).unsqueeze(0) < lengths.unsqueeze(1)
    if not torch.equal(am.bool(), expected):
        return None
    return rows, t, lengths


def make_chunks(batches: Sequence[Mapping[str, Any]], *, max_tokens: int) -> list[Chunk]:
    """Regroup batches into length-sorted chunks of ≤ ``max_tokens`` tokens (see module doc).

    Batches that are not right-padded token batches are kept as they are (one chunk each).
    """
    import torch

    if not batches:
        raise InvalidParameterError("no calibration batches; pass data or use the built-in corpus")
    if max_tokens <= 0:
        raise InvalidParameterError(f"max_tokens must be > 0, got {max_tokens}")
    info = [_right_padded_lengths(b) for b in batches]
    mixed_unmasked = "attention_mask" not in batches[0] and len({i[1] for i in info if i}) > 1
    if any(i is None for i in info) or len({tuple(sorted(b)) for b in batches}) != 1 \
            or mixed_unmasked:
        return [_as_chunk(b, torch.full((batch_rows(b),), bi, dtype=torch.long))
                for bi, b in enumerate(batches)]
    rows = [(int(length), bi, r) for bi, i in enumerate(info) if i is not None
            for r, length in enumerate(i[2].tolist())]
    if any(length == 0 for length, _, _ in rows):
        raise InvalidParameterError("a calibration sequence has no tokens (all-zero attention mask)")
    rows.sort(key=lambda x: (-x[0], x[1], x[2]))
    chunks: list[Chunk] = []
    start = 0
    while start < len(rows):
        width = rows[start][0]
        n = 1
        # Grow the chunk while it fits in max_tokens and a row wastes < 1/8 of it as padding.
        while (start + n < len(rows) and (n + 1) * width <= max_tokens
               and rows[start + n][0] * 8 >= width * 7):
            n += 1
        sel = rows[start:start + n]
        batch: dict[str, Any] = {}
        for key in batches[0]:
            parts = []
            for _, bi, r in sel:
                v = batches[bi][key][r:r + 1]
                if v.dim() >= 2:
                    v = v[:, :width]
                    if v.shape[1] < width:  # from a shorter batch: pad (masked out) to width
                        pad = v.new_zeros((1, width - v.shape[1], *v.shape[2:]))
                        v = torch.cat([v, pad], 1)
                parts.append(v)
            batch[key] = torch.cat(parts, 0)
        chunks.append(_as_chunk(batch, torch.tensor([bi for _, bi, _ in sel], dtype=torch.long)))
        start += n
    return chunks


def _as_chunk(batch: Mapping[str, Any], origin: torch.Tensor) -> Chunk:
    return Chunk(batch=dict(batch), origin=origin, mask=None)


def _clone_tree(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, tuple | list):
        return type(obj)(_clone_tree(x) for x in obj)
    return obj


def _repeat_tree(obj: Any, n: int, rows: int) -> Any:
    """Every tensor with ``rows`` leading rows stacked ``n`` times along dim 0; others kept."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.repeat(n, *([1] * (obj.dim() - 1))) if obj.dim() and obj.shape[0] == rows else obj
    if isinstance(obj, tuple | list):
        return type(obj)(_repeat_tree(x, n, rows) for x in obj)
    return obj


def _repeat_batch(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The batch with every row tensor stacked ``n`` times (see :meth:`BlockCache.outputs_from`).

    Raises:
        InvalidParameterError: a tensor whose leading dimension is not the batch's rows.
    """
    import torch

    rows = batch_rows(batch)
    out: dict[str, Any] = {}
    for key, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            if v.shape[0] != rows:
                raise InvalidParameterError(
                    f"batch tensor {key!r} has {v.shape[0]} leading rows, not {rows}; cannot repeat it")
            v = v.repeat(n, *([1] * (v.dim() - 1)))
        out[key] = v
    return out


def _first_tensor(obj: Any) -> torch.Tensor:
    """A block's hidden state: its output, or the first element of a tuple output."""
    import torch

    while isinstance(obj, tuple | list):
        obj = obj[0]
    if not isinstance(obj, torch.Tensor):
        raise InvalidParameterError(f"a block returned {type(obj).__name__}, not a tensor")
    return obj


class _StopForward(Exception):
    """Raised by a hook to end a forward early (internal control flow of block_output)."""


def _detach_tree(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple | list):
        return type(obj)(_detach_tree(x) for x in obj)
    return obj


class BlockCache:
    """Reference outputs and per-block outputs of every chunk (see the module docstring).

    Memory: the outputs of every block for every token (n_blocks × tokens × hidden floats), or,
    under ``max_bytes``, of every ``stride``-th block only (blocks ``stride − 1``,
    ``2·stride − 1``, …; :func:`block_stride`): a replay from block k then recomputes the blocks
    after the last kept one below k as well, which gives the same outputs while the weights
    before k are those the cache was recorded at (``max_bytes=0`` keeps none: every query is a
    full forward, for callers that only need the reference outputs). The
    reference outputs (tokens × vocabulary floats for a causal LM) go to an
    :class:`~allocator.model.output_store.OutputStore` (in memory up to its budget, the rest on
    disk, read back one chunk at a time). With ``on_output``, each chunk's output is handed to
    it as ``on_output(chunk, output)`` (the chunk with its token mask) instead of being kept:
    ``reference`` stays empty.
    """

    def __init__(self, model: torch.nn.Module, chunks: Sequence[Chunk], *, kind: str,
                 on_output: Callable[[Chunk, torch.Tensor], None] | None = None,
                 max_bytes: int | None = None) -> None:
        import torch

        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                      or max_bytes < 0):
            raise InvalidParameterError(f"block cache max_bytes must be an int ≥ 0 or None, "
                                        f"got {max_bytes!r}")
        self.model, self.kind = model, kind
        found = find_blocks(model)
        self.prefix, self.blocks = (found[0], list(found[1])) if found else ("", [])
        self.block_out: list[list[Any]] = []  # [chunk][block]; None where a block is not kept
        self.reference = OutputStore()
        self.chunks: list[Chunk] = []
        self.kept = [True] * len(self.blocks)
        order: list[str] = []
        total_tokens = sum(batch_rows(c.batch) * _width(c.batch) for c in chunks)
        for ci, chunk in enumerate(chunks):
            calls: list[int] = []
            outs: list[Any] = [None] * len(self.blocks)
            with torch.inference_mode(), self._recording(outs, calls), \
                    (self._tracing(order) if ci == 0 else _null()):
                ref = forward_outputs(model, chunk.batch, kind)
            if calls != list(range(len(self.blocks))):
                # Shared or re-entered blocks (ALBERT) or a skipped one: cannot skip safely.
                self.prefix, self.blocks, self.kept = "", [], []
                outs = []
            if ci == 0 and max_bytes is not None and self.blocks:
                # the first chunk's outputs, scaled to every chunk's tokens, size the whole cache
                share = batch_rows(chunk.batch) * _width(chunk.batch) / max(total_tokens, 1)
                per_block = sum(_tree_bytes(o) for o in outs) / len(outs) / max(share, 1e-12)
                stride = block_stride(len(self.blocks), per_block, max_bytes)
                self.kept = [stride > 0 and (k + 1) % stride == 0 for k in range(len(self.blocks))]
            outs = [o if keep else None for o, keep in zip(outs, self.kept, strict=True)]
            self.block_out.append(outs)
            self.chunks.append(Chunk(batch=chunk.batch, origin=chunk.origin,
                                     mask=_output_mask(chunk.batch, ref)))
            if on_output is not None:
                on_output(self.chunks[-1], ref)
            else:
                self.reference.append(ref)
            del ref
        if not self.blocks:
            self.block_out = [[] for _ in self.chunks]
        self._order = order

    # ------------------------------------------------------------------ hooks
    @contextmanager
    def _recording(self, outs: list[Any], calls: list[int]) -> Iterator[None]:
        handles = []
        for i, block in enumerate(self.blocks):
            def hook(_m: Any, _a: Any, out: Any, i: int = i) -> None:
                calls.append(i)
                if self.kept[i]:
                    outs[i] = _detach_tree(out)
            handles.append(block.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def _tracing(self, order: list[str]) -> Iterator[None]:
        handles = []
        for name, mod in self.model.named_modules():
            def pre(_m: Any, _a: Any, name: str = name) -> None:
                order.append(name)
            handles.append(mod.register_forward_pre_hook(pre))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ queries
    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def start_block(self, unit: Unit) -> int:
        """First block whose computation the unit's weight can change (0 = full forward).

        A unit inside block k starts at k; a unit executed only after the last block (head,
        pooler) starts at ``n_blocks``; anything else — or a weight shared with a module that
        runs earlier (tied embeddings) — starts at 0.
        """
        if not self.blocks:
            return 0
        owners = _modules_sharing_weight(self.model, unit.module)
        return min(self._start_of(name) for name in owners)

    def block_of(self, unit: Unit) -> int | None:
        """The block k whose forward executes the unit's weight (and nothing earlier shares it),
        or None for units outside the blocks, shared weights and models without a block list."""
        if not self.blocks or self.shares_weight(unit):
            return None
        m = re.match(rf"^{re.escape(self.prefix)}\.(\d+)\.", unit.module)
        return int(m[1]) if m and int(m[1]) < self.n_blocks else None

    def shares_weight(self, unit: Unit) -> bool:
        """Whether another module owns a parameter stored in the unit's weight memory."""
        return len(_modules_sharing_weight(self.model, unit.module)) > 1

    def _start_of(self, module: str) -> int:
        m = re.match(rf"^{re.escape(self.prefix)}\.(\d+)(?:\.|$)", module)
        if m and int(m[1]) < self.n_blocks:
            return int(m[1])
        last = f"{self.prefix}.{self.n_blocks - 1}"
        try:
            first_call = self._order.index(module)
            last_block = self._order.index(last)
        except ValueError:
            return 0
        return self.n_blocks if first_call > last_block else 0

    def outputs_from(self, ci: int, start: int, *, repeat: int = 1) -> torch.Tensor:
        """Model outputs of chunk ``ci`` recomputing only blocks ``start..`` (call under no-grad).

        ``repeat`` = n runs the chunk n times in one forward, stacked along the batch dimension
        (rows r, r + R, r + 2R, … are copies of row r): with a unit patched to use a different
        weight per copy, n options of that unit cost one forward of n·R rows.
        """
        chunk = self.chunks[ci]
        batch = chunk.batch if repeat == 1 else _repeat_batch(chunk.batch, repeat)
        last = next((k for k in range(min(start, self.n_blocks) - 1, -1, -1) if self.kept[k]), None)
        if last is None:
            return forward_outputs(self.model, batch, self.kind)
        cached = self.block_out[ci][last]
        if repeat != 1:
            cached = _repeat_tree(cached, repeat, batch_rows(chunk.batch))
        skipped = self.blocks[:last + 1]

        def replay(*_a: Any, **_k: Any) -> Any:
            return _clone_tree(cached)  # a clone: the next block may update its input in place

        for b in skipped:
            b.forward = replay
        try:
            return forward_outputs(self.model, batch, self.kind)
        finally:
            for b in skipped:
                del b.forward

    def block_output(self, ci: int, k: int, *, repeat: int = 1) -> torch.Tensor:
        """Hidden state leaving block ``k`` of chunk ``ci``, recomputing block ``k`` only (blocks
        0..k−1 replayed, the forward stopped right after block k; call under no-grad).

        Raises:
            InvalidParameterError: no block list, or ``k`` out of range.
        """
        if not 0 <= k < self.n_blocks:
            raise InvalidParameterError(f"block {k} out of range 0..{self.n_blocks - 1}")
        captured: list[Any] = []

        def stop(_m: Any, _a: Any, out: Any) -> None:
            captured.append(out)
            raise _StopForward  # nothing after block k is needed: skip it

        handle = self.blocks[k].register_forward_hook(stop)
        try:
            self.outputs_from(ci, k, repeat=repeat)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return _first_tensor(captured[0])

    def cached_block_output(self, ci: int, k: int) -> torch.Tensor:
        """The full-precision hidden state leaving block ``k`` of chunk ``ci``.

        Raises:
            InvalidParameterError: block ``k``'s output was not kept (``max_bytes``).
        """
        if not (0 <= k < self.n_blocks and self.kept[k]):
            raise InvalidParameterError(f"block {k}'s output is not in the cache (kept: every "
                                        "block's only without max_bytes); use block_output")
        return _first_tensor(self.block_out[ci][k])

    def tokens(self) -> int:
        return sum(batch_rows(c.batch) * _width(c.batch) for c in self.chunks)


def block_stride(n_blocks: int, per_block_bytes: float, max_bytes: int) -> int:
    """Keep every ``stride``-th block's outputs so that they fit ``max_bytes``: 1 keeps every
    block, 0 none. With m = ⌊max_bytes / per_block_bytes⌋ blocks affordable, the smallest
    stride s with ⌊n / s⌋ ≤ m is s = ⌊n / (m + 1)⌋ + 1 (a replay recomputes < s extra blocks)."""
    m = int(max_bytes // per_block_bytes) if per_block_bytes > 0 else n_blocks
    return 0 if m <= 0 else n_blocks // (m + 1) + 1


def _tree_bytes(obj: Any) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, tuple | list):
        return sum(_tree_bytes(x) for x in obj)
    return 0


def _width(batch: Mapping[str, Any]) -> int:
    ids = batch.get("input_ids")
    return int(ids.shape[1]) if ids is not None and ids.dim() >= 2 else 1


def _modules_sharing_weight(model: torch.nn.Module, module: str) -> list[str]:
    """``module`` plus every module that owns a parameter stored in the same memory."""
    import torch

    w = get_module(model, module).weight
    if not isinstance(w, torch.Tensor):
        return [module]
    ptr = w.data_ptr()
    names = {module}
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            if p.data_ptr() == ptr:
                names.add(name)
    return sorted(names)


@contextmanager
def _null() -> Iterator[None]:
    yield

