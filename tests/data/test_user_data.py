"""The user's --data / --eval-data files: the hash split, sources and refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from allocator.core.errors import InvalidParameterError
from allocator.model.data import corpus_texts, data_description
from allocator.model.data.user import HELD_OUT_SHARE, overlap, split_user_texts, user_split_of

TEXTS = corpus_texts("train")[:200]


def _write(path: Path, texts: list[str]) -> Path:
    path.write_text("\n\n".join(texts), encoding="utf-8")
    return path


def test_hash_split_is_disjoint_order_free_and_near_the_share() -> None:
    calib, held = split_user_texts(TEXTS)
    assert not set(calib) & set(held) and len(calib) + len(held) == len(TEXTS)
    assert abs(len(held) / len(TEXTS) - HELD_OUT_SHARE / 100) < 0.1
    calib2, held2 = split_user_texts(list(reversed(TEXTS)) + TEXTS[:10])  # order, duplicates
    assert set(calib2) == set(calib) and set(held2) == set(held)
    assert all(user_split_of(t) == "evaluation" for t in held)


def test_too_small_a_file_is_refused_with_the_fix() -> None:
    one_side = [t for t in TEXTS if user_split_of(t) == "calibration"][:3]
    with pytest.raises(InvalidParameterError, match="--eval-data"):
        split_user_texts(one_side)


def test_batches_come_from_the_right_share(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from allocator.model.data import user_data_for
    from allocator.model.loading import load_model

    lm = load_model("tiny-llama")
    data = _write(tmp_path / "mine.txt", TEXTS[:80])
    ev = tmp_path / "held.jsonl"
    ev.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[100:140]), encoding="utf-8")
    common: dict[str, Any] = {"seq_len": 32, "batch_size": 4}
    cal = user_data_for(lm, "calibration", 4, data=data, **common)
    held = user_data_for(lm, "evaluation", 4, data=data, **common)
    assert cal.source == "file:mine.txt#calibration" and held.source == "file:mine.txt#held-out"
    assert cal.pack and held.n_samples == 4 and cal.fingerprint != held.fingerprint
    whole = user_data_for(lm, "evaluation", 4, data=data, eval_data=ev, **common)
    assert whole.source == "file:held.jsonl"
    assert user_data_for(lm, "calibration", 4, data=data, eval_data=ev, **common).source == \
        "file:mine.txt"
    assert user_data_for(lm, "calibration", 4, eval_data=ev, **common).source.startswith("builtin:")
    # apply --method gptq calibrates on the whole file; it has no held-out data to give
    assert user_data_for(lm, "calibration", 4, data=data, holdout=False, **common).source == \
        "file:mine.txt"
    with pytest.raises(InvalidParameterError, match="held-out"):
        user_data_for(lm, "evaluation", 4, data=data, holdout=False, **common)
    vit = load_model("vit-digits")
    with pytest.raises(InvalidParameterError, match="no tokenizer"):
        user_data_for(vit, "calibration", 4, data=data)


def test_descriptions_say_where_the_data_came_from(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.txt", TEXTS[:20])
    b = _write(tmp_path / "b.txt", TEXTS[15:30])
    assert "built-in" in data_description(None, None)["evaluation"]
    only = data_description(a, None)
    assert "held-out share" in only["evaluation"] and "a.txt" in only["calibration"]
    both = data_description(a, b)
    assert overlap(a, b) == 5 and "5 text(s) also in --data" in both["evaluation"]
