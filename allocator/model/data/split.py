"""Fit and validation shares of the calibration samples, by a hash of each sample's content.

Refinement (:mod:`allocator.jobs.refine`) measures its moves on the *fit* share and judges
every candidate and every trial plan on the *validation* share, so an accepted move is one that
also helps on samples it was not measured on.

A sample is one row of a batch: one text (its unpadded token ids) for encoders and classifiers,
one packed window of token ids for causal LMs (a window may hold the end of one text and the
start of the next, so a text can straddle the two shares), one image for the digits
classifier. Its key is

    key(s) = sha256("bitalloc-validation:" + Σ_tensors name ‖ dtype ‖ shape ‖ bytes of s's row)

with padding (``attention_mask`` 0) left out. With ``n`` samples and share ``v``, the validation
share is every sample whose key is at most the ``n_val``-th smallest key,

    n_val = max(MIN_SHARE_SAMPLES, round(v · n)),

so identical samples always land on one side, and the split depends on the samples' content
only: not on their order, their batch layout or the seed. Both shares keep the batch size and
the order the samples had; each needs at least :data:`MIN_SHARE_SAMPLES` samples.

torch is imported lazily.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError
from allocator.model.data.batches import batch_rows

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_VALIDATION_SHARE", "MIN_SHARE_SAMPLES", "SampleSplit", "check_share",
           "sample_keys", "split_calibration", "validation_rows"]

#: share of the calibration samples that judges candidates and refinement moves
DEFAULT_VALIDATION_SHARE = 0.25
#: fewest samples either share may have
MIN_SHARE_SAMPLES = 2
#: the largest validation share: the fit share must stay the larger one
MAX_SHARE = 0.5
_SALT = b"bitalloc-validation:"


def check_share(share: object, *, what: str = "validation_share") -> float:
    """``share`` as a float in {0} ∪ (0, :data:`MAX_SHARE`] (0: no validation share)."""
    if isinstance(share, bool) or not isinstance(share, int | float) or math.isnan(share) \
            or not 0 <= share <= MAX_SHARE:
        raise InvalidParameterError(f"{what} must be a number in [0, {MAX_SHARE}] (0: no validation "
                                    f"share), got {share!r}")
    return float(share)


def _row(batch: Mapping[str, Any], key: str, r: int, rows: int) -> torch.Tensor | None:
    """Row ``r`` of tensor ``key`` with its padding left out (None: not a per-row tensor)."""
    import torch

    v = batch[key]
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != rows:
        return None
    x = v[r]
    am = batch.get("attention_mask")
    if isinstance(am, torch.Tensor) and am.dim() == 2 and x.dim() >= 1 and x.shape[0] == am.shape[1]:
        x = x[am[r].bool()]
    return x


def sample_keys(batches: Sequence[Mapping[str, Any]]) -> list[str]:
    """The key of every sample (row) of ``batches``, in order (module docstring)."""
    import torch

    keys: list[str] = []
    for b in batches:
        rows = batch_rows(b)
        for r in range(rows):
            h = hashlib.sha256(_SALT)
            for key in sorted(b):
                x = _row(b, key, r, rows)
                if x is None:
                    continue
                t = x.detach().to("cpu").contiguous()
                h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
                if t.numel():
                    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            keys.append(h.hexdigest())
    return keys


def validation_rows(keys: Sequence[str], share: float) -> list[bool]:
    """Which samples are in the validation share: key ≤ the ``n_val``-th smallest key.

    Raises:
        InvalidParameterError: either share would hold fewer than :data:`MIN_SHARE_SAMPLES`.
    """
    n = len(keys)
    n_val = max(MIN_SHARE_SAMPLES, round(share * n))
    if n - n_val < MIN_SHARE_SAMPLES:
        raise InvalidParameterError(
            f"{n} calibration sample(s) are too few for a {100 * share:g} % validation share (each "
            f"share needs ≥ {MIN_SHARE_SAMPLES}); raise --samples or pass --validation-share 0")
    cut = sorted(keys)[n_val - 1]
    got = [k <= cut for k in keys]
    if n - sum(got) < MIN_SHARE_SAMPLES:  # duplicates of the cut key took the fit share's samples
        raise InvalidParameterError(
            f"the {n} calibration samples hold too few distinct ones for a validation share; "
            f"pass more varied data or --validation-share 0")
    return got


def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rows of one tensor stacked; rows of different lengths (dim 1) zero-padded to the longest."""
    import torch

    if parts[0].dim() >= 2:
        width = max(int(p.shape[1]) for p in parts)
        parts = [p if p.shape[1] == width else
                 torch.cat([p, p.new_zeros((1, width - p.shape[1], *p.shape[2:]))], 1) for p in parts]
    return torch.cat(parts, 0)


def _rebatch(batches: Sequence[Mapping[str, Any]], picks: list[tuple[int, int]],
             batch_size: int) -> tuple[dict[str, Any], ...]:
    """Batches of ``batch_size`` of the rows ``picks`` (batch, row), each trimmed of the padding
    columns its rows no longer need (padding with 0 under a 0 mask, as the block cache does)."""
    import torch

    out: list[dict[str, Any]] = []
    for s in range(0, len(picks), batch_size):
        sel = picks[s:s + batch_size]
        batch: dict[str, Any] = {}
        first = batches[sel[0][0]]
        width = None
        if isinstance(first.get("attention_mask"), torch.Tensor):
            width = max(int(batches[bi]["attention_mask"][r].sum()) for bi, r in sel)
        for key in first:
            parts = []
            for bi, r in sel:
                v = batches[bi][key]
                if not isinstance(v, torch.Tensor) or v.dim() == 0:
                    break
                row = v[r:r + 1]
                am = batches[bi].get("attention_mask")
                if width is not None and row.dim() >= 2 and am is not None and \
                        row.shape[1] == am.shape[1]:
                    row = row[:, :width]
                parts.append(row)
            batch[key] = _stack(parts) if len(parts) == len(sel) else first[key]
        out.append(batch)
    return tuple(out)


@dataclass(frozen=True, kw_only=True, eq=False)
class SampleSplit:
    """The fit and validation shares of one calibration set (module docstring).

    ``fit`` and ``validation`` have the type of the data split (a
    :class:`~allocator.model.data.CalibrationData` or ``DigitsData`` with its fingerprint of the
    share's batches), or are tuples of batches when plain batches were split.
    """

    fit: Any
    validation: Any
    share: float
    n_fit: int
    n_validation: int
    fit_fingerprint: str
    validation_fingerprint: str

    def metadata(self) -> dict[str, Any]:
        """JSON-able record of the split (for results.json)."""
        return {"share": self.share, "n_fit": self.n_fit, "n_validation": self.n_validation,
                "rule": f"samples hashed (sha256 of their token ids / pixels, padding left out); the "
                        f"{self.n_validation} smallest keys are the validation share",
                "fit_fingerprint": self.fit_fingerprint,
                "validation_fingerprint": self.validation_fingerprint}


def split_calibration(data: Any, share: float = DEFAULT_VALIDATION_SHARE) -> SampleSplit:
    """Split ``data`` (calibration batches, or a data object with ``batches``) into fit and
    validation shares by sample hash (module docstring).

    Raises:
        InvalidParameterError: ``share`` outside (0, 0.5], or too few samples for both shares.
    """
    from allocator.model.data.batches import batches_fingerprint

    share = check_share(share)
    if share == 0:
        raise InvalidParameterError("split_calibration needs a validation share > 0")
    batches = list(getattr(data, "batches", data))
    if not batches:
        raise InvalidParameterError("no calibration batches to split")
    keys = sample_keys(batches)
    val = validation_rows(keys, share)
    where = [(bi, r) for bi, b in enumerate(batches) for r in range(batch_rows(b))]
    size = max(batch_rows(b) for b in batches)
    size = int(getattr(data, "batch_size", size) or size)
    fit_rows = [w for w, v in zip(where, val, strict=True) if not v]
    val_rows = [w for w, v in zip(where, val, strict=True) if v]
    fit_b, val_b = _rebatch(batches, fit_rows, size), _rebatch(batches, val_rows, size)

    def share_of(new: tuple[dict[str, Any], ...], picks: list[tuple[int, int]], label: str) -> Any:
        if not dataclasses.is_dataclass(data) or isinstance(data, type):
            return new
        fields: dict[str, Any] = {"batches": new, "n_samples": len(picks), "fingerprint": ""}
        names = {f.name for f in dataclasses.fields(data)}
        if "source" in names:
            fields["source"] = f"{getattr(data, 'source', '')}#{label}"
        indices = getattr(data, "indices", None)
        if isinstance(indices, tuple) and len(indices) == len(where):
            pos = {w: i for i, w in enumerate(where)}
            fields["indices"] = tuple(indices[pos[w]] for w in picks)
        return dataclasses.replace(data, **fields)

    fit, validation = share_of(fit_b, fit_rows, "fit"), share_of(val_b, val_rows, "validation")
    return SampleSplit(fit=fit, validation=validation, share=share, n_fit=len(fit_rows),
                       n_validation=len(val_rows), fit_fingerprint=batches_fingerprint(fit_b),
                       validation_fingerprint=batches_fingerprint(val_b))
