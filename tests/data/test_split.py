"""Fit / validation shares of the calibration samples (allocator.model.data.split)."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.model.data import CalibrationData  # noqa: E402
from allocator.model.data.split import (  # noqa: E402
    MIN_SHARE_SAMPLES,
    sample_keys,
    split_calibration,
    validation_rows,
)


def _rows(n: int, seed: int = 0) -> list[list[int]]:
    """``n`` distinct token rows of 3–12 tokens."""
    rng = random.Random(seed)
    return [[i + 1000, *(rng.randrange(1, 999) for _ in range(rng.randrange(2, 12)))] for i in range(n)]


def _batches(rows: list[list[int]], size: int, *, extra_pad: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches (pad id 0) of ``size`` rows, ``extra_pad`` more padding columns."""
    out = []
    for s in range(0, len(rows), size):
        chunk = rows[s:s + size]
        width = max(len(r) for r in chunk) + extra_pad
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _tokens(batches: object) -> list[tuple[int, ...]]:
    """The unpadded token rows of batches, in order."""
    got = []
    for b in batches:  # type: ignore[attr-defined]
        for ids, m in zip(b["input_ids"], b["attention_mask"], strict=True):
            got.append(tuple(int(t) for t in ids[m.bool()]))
    return got


def test_split_is_disjoint_covers_everything_and_has_the_share() -> None:
    rows = _rows(40)
    split = split_calibration(_batches(rows, 8), 0.25)
    fit, val = _tokens(split.fit), _tokens(split.validation)
    assert (split.n_fit, split.n_validation) == (30, 10) == (len(fit), len(val))
    assert not set(fit) & set(val)
    assert sorted(fit + val) == sorted(tuple(r) for r in rows)
    assert all(len(b["input_ids"]) <= 8 for b in (*split.fit, *split.validation))
    # each share keeps the samples' order and trims padding it no longer needs
    order = {tuple(r): i for i, r in enumerate(rows)}
    assert [order[t] for t in fit] == sorted(order[t] for t in fit)
    for b in (*split.fit, *split.validation):
        assert int(b["attention_mask"][:, -1].sum()) > 0


def test_split_is_deterministic_and_stable_to_order_batches_and_padding() -> None:
    rows = _rows(40)
    first = split_calibration(_batches(rows, 8), 0.25)
    again = split_calibration(_batches(rows, 8), 0.25)
    assert _tokens(first.validation) == _tokens(again.validation)
    assert first.validation_fingerprint == again.validation_fingerprint
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    other = split_calibration(_batches(shuffled, 5, extra_pad=4), 0.25)
    assert set(_tokens(other.validation)) == set(_tokens(first.validation))
    assert set(_tokens(other.fit)) == set(_tokens(first.fit))


def test_keys_ignore_padding_and_see_content() -> None:
    rows = _rows(6)
    a = sample_keys(_batches(rows, 6))
    b = sample_keys(_batches(rows, 2, extra_pad=7))
    assert a == b
    changed = [rows[0][:-1] + [rows[0][-1] + 1], *rows[1:]]
    c = sample_keys(_batches(changed, 6))
    assert c[0] != a[0] and c[1:] == a[1:]


def test_identical_samples_land_on_one_side() -> None:
    rows = _rows(30)
    rows += [rows[i] for i in range(0, 30, 3)]  # ten duplicates
    split = split_calibration(_batches(rows, 8), 0.25)
    fit, val = _tokens(split.fit), _tokens(split.validation)
    assert not set(fit) & set(val) and len(fit) + len(val) == 40


def test_validation_rows_cut_at_the_share() -> None:
    keys = [f"{i:04x}" for i in (9, 3, 7, 1, 5, 2, 8, 0, 6, 4)]
    assert validation_rows(keys, 0.3) == [k in ("0000", "0001", "0002") for k in keys]
    # at least MIN_SHARE_SAMPLES on the validation side, whatever the share
    assert sum(validation_rows(keys, 0.01)) == MIN_SHARE_SAMPLES


@pytest.mark.parametrize("n", [1, 2, 3])
def test_too_few_samples_refused_in_one_line(n: int) -> None:
    with pytest.raises(InvalidParameterError, match="too few") as err:
        split_calibration(_batches(_rows(n), 4), 0.25)
    assert "\n" not in str(err.value) and "--validation-share 0" in str(err.value)


@pytest.mark.parametrize("share", [0, -0.1, 0.75, float("nan"), True, "0.25"])
def test_bad_shares_refused(share: object) -> None:
    with pytest.raises(InvalidParameterError, match="validation"):
        split_calibration(_batches(_rows(20), 4), share)  # type: ignore[arg-type]


def test_calibration_data_keeps_its_type_and_records_each_share() -> None:
    rows = _rows(24)
    data = CalibrationData(batches=tuple(_batches(rows, 8)), n_samples=24, seq_len=16,
                           batch_size=8, seed=0, source="texts")
    split = split_calibration(data, 0.25)
    assert isinstance(split.fit, CalibrationData) and isinstance(split.validation, CalibrationData)
    assert split.fit.n_samples == 18 and split.validation.n_samples == 6
    assert split.fit.source == "texts#fit" and split.validation.source == "texts#validation"
    assert split.fit.fingerprint == split.fit_fingerprint != data.fingerprint
    assert split.validation.fingerprint == split.validation_fingerprint
    meta = split.metadata()
    assert meta["n_fit"] == 18 and meta["n_validation"] == 6 and meta["share"] == 0.25


def test_digits_images_split_with_their_indices() -> None:
    pytest.importorskip("sklearn")
    from allocator.model.data import DigitsData

    data = DigitsData.from_split("calibration", n_samples=40, batch_size=16)
    split = split_calibration(data, 0.25)
    assert split.validation.n_samples == 10 and split.fit.n_samples == 30
    assert sorted(split.fit.indices + split.validation.indices) == sorted(data.indices)
    pos = {ix: k for k, ix in enumerate(data.indices)}
    every = torch.cat([b["labels"] for b in data])
    got = torch.cat([b["labels"] for b in split.validation])
    assert got.tolist() == [int(every[pos[i]]) for i in split.validation.indices]
