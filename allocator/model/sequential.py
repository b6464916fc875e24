"""Block-by-block (sequential) execution of a Hugging Face model larger than memory allows.

The model is built as a skeleton whose parameters live on the ``meta`` device (no storage);
only the non-block parts (embeddings, final norm, head; buffers such as rotary frequencies are
real from the start) are read from the safetensors file(s). The transformer blocks are then
loaded one at a time, run on cached inputs and released back to ``meta``, as the GPTQ reference
driver does:

* capture: run the model on every calibration batch with a forward pre-hook on block 0 that
  stores the block's positional and keyword inputs (hidden states, attention mask, position
  embeddings, ...) and raises :class:`_Stop` — the "Catcher" trick, independent of how a given
  transformers version builds masks and positions;
* for block ``i``: load its weights (only the keys under its prefix), hand it to the caller
  (which may hook or quantize it), run it on the cached inputs, keep its outputs as block
  ``i+1``'s inputs, release it.

Peak parameter memory: ``P_nonblock + max_i P_block_i`` (:attr:`SequentialModel.peak_params`
records what was reached), plus the cached activations ``n_batches × B × T × hidden`` and the
block's own activations for one batch.

torch, transformers and safetensors are imported inside the functions.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.core.errors import ModelError
from allocator.model.loading import _dtype, _read_config, detect_kind, resolve_model

if TYPE_CHECKING:
    import torch

__all__ = ["BlockInputs", "BlockRunner", "BlockStep", "ResidentModel", "SequentialModel",
           "materialised_params"]

_NON_INPUT_KEYS = ("labels", "label")
_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


class _Stop(Exception):  # noqa: N818  (a control-flow signal, not an error)
    """Raised by the capture hook once block 0's inputs are stored."""


@dataclass(frozen=True, kw_only=True, eq=False)
class BlockInputs:
    """What one calibration batch feeds a block: hidden states, the other positional arguments,
    the keyword arguments, and the batch's attention mask (which token rows are real)."""

    hidden: torch.Tensor
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    token_mask: torch.Tensor | None = None


@dataclass(frozen=True, kw_only=True, eq=False)
class BlockStep:
    """Block ``index`` (module name ``name``) loaded with its weights, and its cached inputs."""

    index: int
    name: str
    module: torch.nn.Module
    inputs: Sequence[BlockInputs]

    def run(self, i: int) -> torch.Tensor:
        """The block's output hidden states for cached batch ``i``."""
        inp = self.inputs[i]
        out = self.module(inp.hidden, *inp.args, **inp.kwargs)
        # older transformers return (hidden, attn_weights, ...), newer a bare tensor
        return out[0] if isinstance(out, tuple) else out


def materialised_params(model: torch.nn.Module) -> int:
    """Parameters of ``model`` that hold storage (not on ``meta``), tied tensors counted once."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if p.device.type != "meta" and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


@contextmanager
def _params_on_meta() -> Iterator[None]:
    """Register every new parameter on ``meta`` while buffers stay real (accelerate's
    ``init_empty_weights(include_buffers=False)``): non-persistent buffers such as rotary
    ``inv_freq`` are computed in ``__init__`` and are not in the checkpoint, so they must be real.
    Each parameter's ``torch.empty`` is moved to meta before its initialiser touches it.

    The patch is process-wide while the skeleton is built: a module constructed concurrently in
    another thread would also get meta parameters, so build skeletons from one thread."""
    import torch

    original = torch.nn.Module.register_parameter

    def register(self: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None:
            p = self._parameters[name]
            assert p is not None
            self._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def _weight_files(path: Path) -> dict[str, Path]:
    """Checkpoint key → safetensors file, from ``model.safetensors`` or the sharded index."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot read {str(index)!r} ({e}); fix or re-save the model") from e
        return {k: path / v for k, v in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise ModelError(f"{str(path)!r} has neither model.safetensors nor "
                         f"model.safetensors.index.json; sequential mode reads safetensors only")
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


class BlockRunner(ABC):
    """A model's transformer blocks run one at a time on cached inputs: the block layout, the
    capture of block 0's inputs and the block-by-block driver. Subclasses say where a block's
    weights come from (:meth:`load_block`) and where they go afterwards (:meth:`release_block`).

    Attributes set by subclasses: ``model`` (eval mode), ``kind``, ``device``, ``source`` (what
    error messages call the model).
    """

    model: torch.nn.Module
    kind: str
    device: Any
    source: str

    def _init_blocks(self) -> None:
        self.blocks_name, self.blocks = self._find_blocks()
        self.block_names = [f"{self.blocks_name}.{i}" for i in range(len(self.blocks))]
        self.final_inputs: list[BlockInputs] = []  # the last block's outputs, set by steps()

    @abstractmethod
    def load_block(self, i: int) -> torch.nn.Module:
        """Block ``i`` with its weights in memory."""

    @abstractmethod
    def release_block(self, i: int) -> None:
        """Done with block ``i`` for now."""

    # --- layout --------------------------------------------------------------------------------
    def _find_blocks(self) -> tuple[str, torch.nn.ModuleList]:
        """The ModuleList holding most parameters: the transformer blocks."""
        import torch

        best: tuple[int, str, torch.nn.ModuleList] | None = None
        for name, mod in self.model.named_modules():
            if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
                size = sum(p.numel() for p in mod.parameters())
                if best is None or size > best[0]:
                    best = (size, name, mod)
        if best is None:
            raise ModelError(f"model {self.source} has no list of blocks to run one at a "
                             "time; load it whole with load_model instead")
        return best[1], best[2]

    def head(self) -> torch.nn.Module | None:
        """The output head (``get_output_embeddings``), when the model has one."""
        import torch

        get = getattr(self.model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        return head if isinstance(head, torch.nn.Module) else None

    @property
    def head_name(self) -> str | None:
        """The output head's module name (``lm_head``), when the model has one."""
        head = self.head()
        return next((n for n, m in self.model.named_modules() if m is head), None) if head else None

    def input_embedding(self) -> torch.nn.Module | None:
        """The input embedding (``get_input_embeddings``), when the model has one."""
        get_in = getattr(self.model, "get_input_embeddings", None)
        emb = get_in() if callable(get_in) else None
        return emb if emb is not None and hasattr(emb, "weight") else None

    def tied_head(self) -> bool:
        """The output head shares the input embedding's weight (``tie_word_embeddings``)."""
        head, emb = self.head(), self.input_embedding()
        return head is not None and emb is not None and head.weight is emb.weight

    def final_norm(self) -> torch.nn.Module | None:
        """The norm applied after the last block (``norm`` / ``ln_f`` / ...), when there is one."""
        import torch

        parent = self.model.get_submodule(self.blocks_name.rsplit(".", 1)[0]) \
            if "." in self.blocks_name else self.model
        for attr in _FINAL_NORMS:
            mod = getattr(parent, attr, None)
            if isinstance(mod, torch.nn.Module):
                return mod
        return None

    def head_inputs(self) -> list[torch.Tensor]:
        """The output head's inputs per batch: the final norm of the last block's outputs."""
        import torch

        norm = self.final_norm()
        with torch.no_grad():
            return [norm(x.hidden) if norm is not None else x.hidden for x in self.final_inputs]

    # --- the cached-input driver --------------------------------------------------------------
    def capture(self, batches: Sequence[Mapping[str, Any]]) -> list[BlockInputs]:
        """Block 0's inputs for every batch (embeddings and masks computed by the model itself)."""
        import torch

        captured: list[BlockInputs] = []
        current: dict[str, Any] = {}

        def catch(_mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden, *rest = args if args else (kwargs.pop("hidden_states"),)
            captured.append(BlockInputs(hidden=hidden.detach(), args=tuple(rest),
                                        kwargs=_detached(kwargs), token_mask=current.get("mask")))
            raise _Stop

        handle = self.blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in batches:
                    inputs = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
                              for k, v in batch.items() if k not in _NON_INPUT_KEYS}
                    mask = inputs.get("attention_mask")
                    current["mask"] = mask
                    try:
                        self.model(**inputs, use_cache=False)
                    except _Stop:
                        continue
                    raise ModelError("the model's forward never reached its first block; "
                                     "sequential mode needs a standard transformer layout")
        finally:
            handle.remove()
        return captured

    def steps(self, batches: Sequence[Mapping[str, Any]]) -> Iterator[BlockStep]:
        """Yield every block loaded, with its cached inputs; on resume, run it (as the caller
        left it, e.g. quantized) to make the next block's inputs, then release it.

        After the loop :attr:`final_inputs` holds the last block's outputs.
        """
        import torch

        inputs = self.capture(batches)
        for i in range(len(self.blocks)):
            block = self.load_block(i)
            step = BlockStep(index=i, name=self.block_names[i], module=block, inputs=inputs)
            try:
                yield step
                with torch.no_grad():
                    inputs = [BlockInputs(hidden=step.run(j).detach(), args=inp.args,
                                          kwargs=inp.kwargs, token_mask=inp.token_mask)
                              for j, inp in enumerate(inputs)]
            finally:
                self.release_block(i)
        self.final_inputs = inputs


class ResidentModel(BlockRunner):
    """A model already in memory, run block by block (its blocks stay loaded): what lets the
    curvature estimators factor one backward over the blocks instead of repeating it per group
    of units (:mod:`sensitivity._sequential_curvature`).

    Raises:
        ModelError: the model has no list of blocks.
    """

    def __init__(self, model: torch.nn.Module, *, kind: str, device: Any = "cpu") -> None:
        self.model = model
        self.kind = str(kind)
        self.device = device
        self.source = type(model).__name__
        self._init_blocks()
        self.peak_params = materialised_params(model)

    def load_block(self, i: int) -> torch.nn.Module:
        return self.blocks[i]

    def release_block(self, i: int) -> None:
        return None


class SequentialModel(BlockRunner):
    """A Hugging Face model directory run block by block (see the module docstring).

    Args:
        path: a local model directory with ``config.json`` and safetensors weights (or a bundled
            name, as :func:`~allocator.model.loading.load_model` takes).
        dtype: the parameters' dtype after loading (checkpoint tensors are cast to it).
        device: where loaded weights and cached activations live.
    """

    def __init__(self, path: str | os.PathLike[str], *, dtype: Any = "float32",
                 device: str = "cpu") -> None:
        import transformers

        self.name, self.path = resolve_model(path)  # bundled names (tiny-llama) work as in load_model
        config_dict = _read_config(self.path)
        self.dtype = _dtype(dtype)
        self.device = device
        self._files = _weight_files(self.path)
        config = transformers.AutoConfig.from_pretrained(str(self.path), local_files_only=True)
        self.kind = detect_kind(config_dict)
        loader = (transformers.AutoModelForCausalLM if self.kind == "causal_lm"
                  else transformers.AutoModel)
        with _params_on_meta():
            model = loader.from_config(config, dtype=self.dtype)
        self.model = model.eval()
        self.source = repr(str(self.path))
        self._init_blocks()
        self._load(self.model, "", skip=f"{self.blocks_name}.")
        self._tie_head()
        # buffers only: Module.to would try to copy the meta parameters out
        for mod in self.model.modules():
            for bname, b in list(mod.named_buffers(recurse=False)):
                if b is not None and b.device.type != "meta":
                    mod._buffers[bname] = b.to(device)
        self.nonblock_params = materialised_params(self.model)
        self.peak_params = self.nonblock_params

    @property
    def tokenizer(self) -> Any:
        """The directory's tokenizer (None without one): calibration data is built with it, so a
        SequentialModel stands in for a LoadedModel in :func:`allocator.model.data.data_for`."""
        if not hasattr(self, "_tokenizer"):
            import transformers

            tok: Any
            try:
                tok = transformers.AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            except (OSError, ValueError, KeyError):
                tok = None
            self._tokenizer = tok
        return self._tokenizer

    # --- weights ------------------------------------------------------------------------------
    def _load(self, module: torch.nn.Module, prefix: str, *, skip: str | None = None) -> None:
        """Fill the meta parameters of ``module`` (full names ``prefix + name``) from the files,
        opening each file once; parameters under ``skip`` stay on meta."""
        import torch
        from safetensors import safe_open

        wanted: dict[Path, list[tuple[torch.nn.Module, str, str]]] = {}
        for mname, mod in module.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                key = f"{prefix}{mname}.{pname}" if mname else f"{prefix}{pname}"
                if skip is not None and key.startswith(skip) or p.device.type != "meta":
                    continue
                file = self._files.get(key)
                if file is None:
                    if key == self._head_key():
                        continue  # tied to the input embedding, filled by _tie_head
                    raise ModelError(f"weight {key!r} is missing from the safetensors in "
                                     f"{str(self.path)!r}; re-save the model with save_pretrained")
                wanted.setdefault(file, []).append((mod, pname, key))
        for file, items in wanted.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for mod, pname, key in items:
                    t = f.get_tensor(key).to(device=self.device, dtype=self.dtype)
                    mod._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)

    def fingerprint(self) -> str:
        """:func:`~allocator.model.loading.model_fingerprint` of the whole model (the hash
        ``load_model`` records), one parameter read from the files at a time."""
        import hashlib
        from contextlib import ExitStack

        import torch
        from safetensors import safe_open

        h = hashlib.sha256()
        with ExitStack() as stack:
            files = {f: stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                     for f in set(self._files.values())}
            for name, p in self.model.named_parameters():  # tied weights once, as model_fingerprint
                t = p.detach() if p.device.type != "meta" else \
                    files[self._files[name]].get_tensor(name).to(dtype=self.dtype)
                t = t.cpu().contiguous()
                h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
                if t.numel():
                    h.update(t.view(-1).view(torch.uint8).numpy().data)
        return h.hexdigest()

    def _head_key(self) -> str | None:
        name = self.head_name
        return f"{name}.weight" if name is not None else None

    def _tie_head(self) -> None:
        """A head absent from the checkpoint shares the input embedding (tie_word_embeddings)."""
        key, head = self._head_key(), self.head()
        if key is None or head is None or key in self._files:
            return
        get_in = getattr(self.model, "get_input_embeddings", None)
        emb = get_in() if callable(get_in) else None
        if emb is None:
            raise ModelError(f"weight {key!r} is missing from the safetensors in "
                             f"{str(self.path)!r}; re-save the model with save_pretrained")
        head.weight = emb.weight

    def load_block(self, i: int) -> torch.nn.Module:
        """Block ``i`` with its weights read from the checkpoint (only its own keys)."""
        block = self.blocks[i]
        self._load(block, f"{self.block_names[i]}.")
        self.peak_params = max(self.peak_params, materialised_params(self.model))
        return block

    def release_block(self, i: int) -> None:
        """Send block ``i``'s parameters back to ``meta`` (their storage is freed)."""
        import torch

        for mod in self.blocks[i].modules():
            for pname, p in list(mod.named_parameters(recurse=False)):
                mod._parameters[pname] = torch.nn.Parameter(p.to("meta"), requires_grad=False)
        return_freed_memory()


def return_freed_memory() -> None:
    """Hand memory freed by a released block back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    glibc raises its mmap threshold after the first large free, so later block-sized tensors come
    from the heap, and a heap does not shrink by itself: a loop that loads and frees one block at
    a time grew to the whole model's size in RSS (an 818M model: 3.1 GB peak for gauss-newton
    block by block, 1.8 GB with the memory handed back).
    """
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC else None
    if trim is not None:
        trim(0)


_LIBC: Any = None


def _detached(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    def det(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach()
        if isinstance(v, tuple):
            return tuple(det(x) for x in v)
        return v

    return {k: det(v) for k, v in kwargs.items()}
