"""Image batches for the bundled digits classifier (``vit-digits``): scikit-learn's digits set.

The data is scikit-learn's bundled ``load_digits`` (1,797 grey 8×8 images of the digits 0–9,
ships inside the ``scikit-learn`` package, nothing is downloaded). Pixels (0–16) are scaled to
[0, 1] and normalised with the fixed train-split statistics :data:`PIXEL_MEAN` / :data:`PIXEL_STD`
(the same constants ``scripts/train_tiny_vit.py`` trained with and wrote to ``training.json``).

Splits are assigned per image index by hashing: bucket = sha256("sklearn-digits:<i>") mod 100;
``train`` < 70, ``calibration`` 70–84, ``evaluation`` 85–99 (1,264 / 277 / 256 images).
Disjoint by construction and independent of any seed; only ``train`` was used for training.

:class:`DigitsData` has the interface of :class:`allocator.model.data.CalibrationData` that the
pipeline, the backend and the estimators use: iterate it for ``{"pixel_values": [B, 1, 8, 8]
float32, "labels": [B] int64}`` batches; ``n_samples``, ``batch_size``, ``seed``,
``fingerprint``, ``metadata()``, ``to(device)``, ``len`` and indexing.

torch and scikit-learn are imported lazily.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError
from allocator.model.data.batches import BatchSequence, CalibrationData, _check_int, batches_fingerprint
from allocator.model.kind import ModelKind

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "DIGITS_SPLITS",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "DigitsData",
    "data_for",
    "digits_split_indices",
    "digits_split_of",
    "load_digits_arrays",
    "normalize_pixels",
    "uses_digits",
]

log = logging.getLogger(__name__)

DIGITS_SPLITS: tuple[str, ...] = ("train", "calibration", "evaluation")
#: Mean and standard deviation of the train-split pixels after scaling to [0, 1] (4 decimals).
PIXEL_MEAN = 0.3053
PIXEL_STD = 0.3761
_SOURCE = "sklearn.datasets.load_digits"


def digits_split_of(index: int) -> str:
    """Split of image ``index``: sha256("sklearn-digits:<index>") mod 100 → train < 70,
    calibration < 85, evaluation otherwise."""
    bucket = int(hashlib.sha256(f"sklearn-digits:{index}".encode()).hexdigest(), 16) % 100
    return "train" if bucket < 70 else "calibration" if bucket < 85 else "evaluation"


def _check_split(split: str) -> str:
    if split not in DIGITS_SPLITS:
        raise InvalidParameterError(f"digits split {split!r} is unknown; choose one of "
                                    f"{', '.join(DIGITS_SPLITS)}")
    return split


@functools.cache
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] float64 in 0–16, targets [1797] int) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise InvalidParameterError("the digits data needs scikit-learn; run "
                                    "pip install 'bitalloc[torch]'") from e
    d = load_digits()
    return d.images, d.target


def digits_split_indices(split: str) -> list[int]:
    """Image indices of ``split`` in ascending order."""
    _check_split(split)
    images, _ = load_digits_arrays()
    return [i for i in range(len(images)) if digits_split_of(i) == split]


def normalize_pixels(images: np.ndarray) -> torch.Tensor:
    """x = (p / 16 − PIXEL_MEAN) / PIXEL_STD as float32 [N, 1, 8, 8] (p: raw 0–16 pixels)."""
    import torch

    x = torch.as_tensor(images, dtype=torch.float64) / 16.0
    return ((x - PIXEL_MEAN) / PIXEL_STD).to(torch.float32).unsqueeze(1)


@dataclass(frozen=True, kw_only=True, eq=False)
class DigitsData(BatchSequence):
    """Labelled digit-image batches plus their provenance; iterate it to get batch dicts."""

    batches: tuple[dict[str, torch.Tensor], ...]
    n_samples: int
    batch_size: int
    seed: int
    split: str
    indices: tuple[int, ...]
    source: str = _SOURCE
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        if not self.batches:
            raise InvalidParameterError("DigitsData needs at least one batch; got none")
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", batches_fingerprint(self.batches))

    @classmethod
    def from_split(cls, split: str = "calibration", *, n_samples: int | None = None,
                   batch_size: int = 16, seed: int = 0) -> DigitsData:
        """The first ``n_samples`` images of ``split`` in seeded order (all when None).

        Fewer samples than asked when the split runs out (a warning is logged; ``n_samples``
        records the real count).
        """
        import torch

        _check_split(split)
        if n_samples is not None:
            _check_int("n_samples", n_samples, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        order = digits_split_indices(split)
        random.Random(seed).shuffle(order)
        chosen = order if n_samples is None else order[:n_samples]
        if n_samples is not None and len(chosen) < n_samples:
            log.warning("only %d of %d digits images in the %s split", len(chosen), n_samples,
                        split)
        images, targets = load_digits_arrays()
        pixels = normalize_pixels(images[chosen])
        labels = torch.as_tensor(targets[chosen], dtype=torch.long)
        batches = tuple({"pixel_values": pixels[s:s + batch_size].clone(),
                         "labels": labels[s:s + batch_size].clone()}
                        for s in range(0, len(chosen), batch_size))
        return cls(batches=batches, n_samples=len(chosen), batch_size=batch_size, seed=seed,
                   split=split, indices=tuple(chosen))

    # --- use ----------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Images over all batches (one prediction per image; kept for CalibrationData parity)."""
        return self.n_samples

    def to(self, device: str | torch.device) -> DigitsData:
        """A copy with every tensor on ``device`` (the fingerprint is kept: same values)."""
        moved = tuple({k: v.to(device) for k, v in b.items()} for b in self.batches)
        return replace(self, batches=moved)

    def metadata(self) -> dict[str, Any]:
        """JSON-able provenance for cost-table / plan metadata."""
        return {"source": f"{self.source}:{self.split}", "n_samples": self.n_samples,
                "batch_size": self.batch_size, "seed": self.seed, "split": self.split,
                "pixel_mean": PIXEL_MEAN, "pixel_std": PIXEL_STD,
                "fingerprint": self.fingerprint}


def uses_digits(loaded: Any) -> bool:
    """Whether a loaded model's data is the digits set (its config says
    ``bitalloc_data = "sklearn-digits"``, as ``scripts/train_tiny_vit.py`` writes)."""
    config = getattr(getattr(loaded, "model", None), "config", None)
    return getattr(config, "bitalloc_data", None) == "sklearn-digits"


def data_for(loaded: Any, split: str, n_samples: int, *, seq_len: int = 128,
             batch_size: int = 16, seed: int = 0, domain: str | None = None) -> Any:
    """The built-in data of ``split`` a loaded model runs on.

    The digits images (:class:`DigitsData`, ``seq_len`` unused) for ``vit-digits`` and any
    model whose config names ``bitalloc_data = "sklearn-digits"``; otherwise token batches of
    the built-in text corpus (:class:`~allocator.model.data.CalibrationData`, packed for causal LMs,
    exactly as the pipeline builds them): the mix of every domain, or ``domain``
    (:mod:`allocator.model.data.domains`; ignored for images).
    """
    if uses_digits(loaded):
        return DigitsData.from_split(split, n_samples=n_samples, batch_size=batch_size, seed=seed)
    if getattr(loaded, "tokenizer", None) is None:
        raise InvalidParameterError(
            f"model {getattr(loaded, 'name', '?')!r} has no tokenizer and no built-in data (only "
            "8×8 grey-image classifiers whose config.json sets \"bitalloc_data\": \"sklearn-digits\" "
            "have); pass its batches from Python: sensitivity.estimate(loaded, EstimateSpec(..., "
            "data=batches))")
    return CalibrationData.from_corpus(loaded.tokenizer, split=split, n_samples=n_samples,
                                       seq_len=seq_len, batch_size=batch_size, seed=seed,
                                       pack=loaded.kind == ModelKind.CAUSAL_LM, domain=domain)
