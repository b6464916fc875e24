"""Save a (fake-quantized) model in the format it came in, so it is a drop-in replacement.

* A sentence-transformers folder (``modules.json`` beside the weights) stays one: the
  Transformer module's weights and tokenizer go where ``modules.json`` says (``path`` ``""`` is
  the folder itself, older models use ``0_Transformer/``), and everything else of the source —
  ``modules.json``, ``sentence_bert_config.json``, ``config_sentence_transformers.json``, the
  pooling / normalise / dense module folders, README — is copied. Weight files of the source are
  never copied (the quantized ones replace them). ``SentenceTransformer(DIR)`` then loads it.
* Any other model (a causal LM, a classifier, a bare encoder): ``save_pretrained`` of the model
  and its tokenizer, loadable with the matching ``AutoModel*.from_pretrained(DIR)``.

The fake-quantized weights are saved in the model's dtype (the values lie on the plan's grids;
packing them into integer formats is the exporters' job, ``bitalloc export``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError, ModelError

if TYPE_CHECKING:
    from allocator.model.loading import LoadedModel

__all__ = ["is_sentence_transformers", "save_model"]

_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
#: source files never copied: the weights the quantized ones replace (and their indexes)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _modules(source: Path) -> list[dict[str, Any]] | None:
    path = source / "modules.json"
    if not path.is_file():
        return None
    try:
        mods = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {str(path)!r} ({e}); fix or re-save the model") from e
    if not isinstance(mods, list) or not all(isinstance(m, dict) for m in mods):
        raise ModelError(f"{str(path)!r} is not a list of modules; fix or re-save the model")
    return mods


def is_sentence_transformers(source: str | Path) -> bool:
    """Whether ``source`` is a sentence-transformers folder (a ``modules.json`` with a
    Transformer module)."""
    mods = _modules(Path(source))
    return bool(mods) and any(m.get("type") == _ST_TRANSFORMER for m in mods or [])


def _is_weight(path: Path) -> bool:
    return path.name.endswith(_WEIGHT_SUFFIXES) or path.name in _WEIGHT_INDEXES


def _copy_tree(src: Path, dst: Path, *, skip: set[Path]) -> None:
    """Copy ``src`` into ``dst`` except weight files, ``skip`` paths and hidden files."""
    for item in sorted(src.iterdir()):
        if item.name.startswith(".") or item in skip or _is_weight(item):
            continue
        target = dst / item.name
        if item.is_dir():
            target.mkdir(exist_ok=True)
            _copy_tree(item, target, skip=skip)
        elif not target.exists():  # what save_pretrained wrote wins (config, tokenizer)
            shutil.copy2(item, target)


def save_model(loaded: LoadedModel, out: str | Path) -> Path:
    """Write ``loaded`` (e.g. after ``apply_plan``) to ``out`` in its source format.

    Raises:
        InvalidParameterError: ``out`` is the source folder itself (it would overwrite it).
        ModelError: the source's ``modules.json`` is unreadable.
    """
    dst = Path(out)
    src = Path(loaded.path)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise InvalidParameterError(f"-o {str(dst)!r} is the model's own folder; write elsewhere")
    dst.mkdir(parents=True, exist_ok=True)
    mods = _modules(src) if src.is_dir() else None
    trans = next((m for m in mods or [] if m.get("type") == _ST_TRANSFORMER), None)
    if trans is None:
        _save_pretrained(loaded, dst)
        return dst
    sub = str(trans.get("path") or "")
    if Path(sub).is_absolute() or ".." in Path(sub).parts:
        raise ModelError(f"modules.json of {str(src)!r} names the Transformer path {sub!r}; "
                         f"expected a folder inside the model")
    weights_dir = dst / sub if sub else dst
    weights_dir.mkdir(parents=True, exist_ok=True)
    _save_pretrained(loaded, weights_dir)
    _copy_tree(src, dst, skip=set())
    return dst


def _save_pretrained(loaded: LoadedModel, where: Path) -> None:
    model = loaded.model
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if _is_gguf(quant):
        # transformers refuses to save a GGUF-loaded model: the same weights in a fresh one
        from allocator.model.smollm2 import plain_copy

        model = plain_copy(model)
    save = getattr(model, "save_pretrained", None)
    if not callable(save):
        raise ModelError(f"model {loaded.name!r} has no save_pretrained; it cannot be saved as a "
                         f"Hugging Face folder")
    save(str(where))
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(str(where))


def _is_gguf(quant: Any) -> bool:
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method)).lower() == "gguf"
