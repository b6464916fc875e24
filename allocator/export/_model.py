"""Module names and weight shapes of a model, for exports (built on the meta device: no weights)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from allocator.core.errors import ModelError
from allocator.core.units import is_linear_like, weight_view
from allocator.model.loading import resolve_model

__all__ = ["ModelInfo", "model_info", "resolve_model_path"]


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """Weight-module names (Linear, Conv1D, Conv, Embedding), [out, in, ...] shapes, HF ``model_type``."""

    names: frozenset[str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    arch: str | None = None


def resolve_model_path(spec: str) -> Path:
    """A bundled model name (``minilm``, ``tiny-llama``, ``vit-digits``, ``smollm2``) or a local
    Hugging Face model directory with a ``config.json`` (the names :func:`load_model` takes)."""
    _, path = resolve_model(spec)
    if not (path / "config.json").is_file():
        raise ModelError(f"model {spec!r} is not a directory with a config.json; pass a local "
                         "Hugging Face model dir or a bundled name (minilm, tiny-llama, smollm2)")
    return path


def model_info(spec: str, wanted: Iterable[str] = ()) -> ModelInfo:
    """Names and shapes of the model at ``spec``.

    Both the task class (``…ForCausalLM``) and the bare ``AutoModel`` are tried, since their
    names differ by a prefix (``model.layers.0…`` vs ``layers.0…``); the first whose names hold
    every module in ``wanted`` is used.
    """
    import torch
    import transformers

    path = resolve_model_path(spec)
    config = transformers.AutoConfig.from_pretrained(path)
    classes: list[type] = []
    for arch_name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch_name, None)
        if isinstance(cls, type):
            classes.append(cls)
    classes.append(transformers.AutoModel)
    want = set(wanted)
    best: ModelInfo | None = None
    for cls in classes:
        with torch.device("meta"):
            model = (cls.from_config(config) if cls is transformers.AutoModel
                     else cls(config))
        shapes = {
            n: tuple(weight_view(m, n).shape) for n, m in model.named_modules()
            if is_linear_like(m)
            or isinstance(m, torch.nn.Embedding | torch.nn.Conv1d | torch.nn.Conv2d)
        }
        info = ModelInfo(names=frozenset(shapes), shapes=shapes, arch=getattr(config, "model_type", None))
        if want <= info.names:
            return info
        best = best or info
    if best is None:  # pragma: no cover - AutoModel is always tried
        raise ModelError(f"model {spec!r} could not be built")
    return best
