"""Per-batch output tensors kept within a memory budget: the rest waits on disk (model side).

The full-precision outputs every metric compares against are the size of the vocabulary per
token: the causal-LM logits of 64 held-out samples of 128 tokens are 1.6 GB for SmolLM2's 49152
tokens and 4.2 GB for a 128k vocabulary. KL(P_fp ‖ P_q) needs each position's whole distribution,
so no smaller summary keeps the metric exact, and computing the reference again costs one more
forward per batch every time it is read (once per plan evaluated, once per refinement trial).
An :class:`OutputStore` therefore keeps items in memory while they fit ``memory_bytes`` and
writes the rest, one file per item, to a private temporary directory (``$TMPDIR``), reading an
item back when it is indexed: the bytes read are the bytes written, so every metric is unchanged,
and what stays resident is the budget plus the item in use. Small models (the bundled ones but
SmolLM2) never touch the disk. The directory is removed with the store.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, overload

from allocator.core.errors import InvalidParameterError

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_MEMORY_BYTES", "OutputStore", "TensorStash"]

#: bytes of outputs an :class:`OutputStore` keeps in memory before it writes items to disk. Small:
#: a refinement holds two stores (fit and validation shares) beside the model, and items read
#: back come from the page cache; at 128 MiB SmolLM2's refinement peaked 0.2 GB higher
DEFAULT_MEMORY_BYTES = 32 * 2**20


class OutputStore(Sequence["torch.Tensor"]):
    """A list of CPU tensors; items past ``memory_bytes`` are on disk (see the module doc)."""

    def __init__(self, *, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes < 0:
            raise InvalidParameterError(f"memory_bytes must be an int ≥ 0, got {memory_bytes!r}")
        self.memory_bytes = memory_bytes
        self.resident_bytes = 0
        self.spilled_bytes = 0
        self._items: list[torch.Tensor | Path] = []
        self._dir: Path | None = None

    def append(self, tensor: torch.Tensor) -> None:
        """Keep ``tensor`` (a CPU copy) in memory if it fits the budget, else write it to disk."""
        import torch

        t = tensor.detach()
        t = t.cpu() if t.device.type != "cpu" else t
        size = t.numel() * t.element_size()
        if self.resident_bytes + size <= self.memory_bytes:
            self._items.append(t)
            self.resident_bytes += size
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="bitalloc-outputs-"))
            weakref.finalize(self, shutil.rmtree, self._dir, True)
        path = self._dir / f"{len(self._items)}.pt"
        t = t.contiguous()
        if t.untyped_storage().nbytes() != size:  # a view: torch.save would write its whole storage
            t = t.clone()
        torch.save(t, path)
        self._items.append(path)
        self.spilled_bytes += size

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, i: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, i: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, i: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        item = self._items[i]
        if isinstance(item, Path):
            import torch

            # mapped, not copied: the pages are released with the tensor
            loaded: torch.Tensor = torch.load(item, weights_only=True, mmap=True)
            return loaded
        return item

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    @property
    def spilled(self) -> bool:
        """Whether any item is on disk."""
        return self._dir is not None


class TensorStash:
    """Copies of named tensors on disk (one file each), read back one at a time: a model's
    full-precision weights to restore after quantizing it, without a second model in memory.

    Tensors that share memory (a head tied to the embedding) are written once.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._store = OutputStore(memory_bytes=0)
        self._index: dict[str, int] = {}
        seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], str], int] = {}
        for name, t in tensors.items():
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.dtype))
            if t.numel() == 0 or key not in seen:
                seen[key] = len(self._store)
                self._store.append(t.detach().clone() if t.numel() == 0 else t)
            self._index[name] = seen[key]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._store[self._index[name]]

    def names(self) -> list[str]:
        return list(self._index)

    def restore(self, model: torch.nn.Module) -> None:
        """Copy every stashed tensor back into ``model``'s state (same names)."""
        import torch

        state = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name in self._index:
                state[name].data.copy_(self[name])
