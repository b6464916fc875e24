"""CalibrationData: shapes, padding, packing, fingerprints, seeding, files, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.model.data import CalibrationData, batches_fingerprint, load_texts, read_text_file  # noqa: E402
from allocator.model.data.corpus import corpus_texts  # noqa: E402
from allocator.model.loading import default_model_path  # noqa: E402


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return transformers.AutoTokenizer.from_pretrained(str(default_model_path()),
                                                      local_files_only=True)


def test_shapes_padding_and_mask(tok) -> None:  # type: ignore[no-untyped-def]
    data = CalibrationData.from_corpus(tok, n_samples=20, seq_len=32, batch_size=8, seed=0)
    assert len(data) == 3 and data.n_samples == 20
    assert [b["input_ids"].shape[0] for b in data] == [8, 8, 4]
    for b in data:
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.dtype == mask.dtype == torch.long
        assert ids.shape == mask.shape and ids.shape[1] <= 32
        lengths = mask.sum(1)
        # right padding: the mask is 1…1 0…0 and padded positions hold the pad id
        assert torch.equal(mask, (torch.arange(ids.shape[1])[None] < lengths[:, None]).long())
        assert bool((ids[mask == 0] == tok.pad_token_id).all())
        assert int(lengths.max()) == ids.shape[1]
    assert data.n_tokens == sum(int(b["attention_mask"].sum()) for b in data)


def test_packed_windows_are_full(tok) -> None:  # type: ignore[no-untyped-def]
    data = CalibrationData.from_corpus(tok, n_samples=10, seq_len=64, batch_size=4, pack=True)
    assert data.n_samples == 10 and data.n_tokens == 640
    assert all(bool(b["attention_mask"].all()) for b in data)
    assert all(b["input_ids"].shape[1] == 64 for b in data)


def test_seed_changes_data_and_fingerprint_is_stable(tok) -> None:  # type: ignore[no-untyped-def]
    a = CalibrationData.from_corpus(tok, n_samples=16, seq_len=32, seed=1)
    b = CalibrationData.from_corpus(tok, n_samples=16, seq_len=32, seed=1)
    c = CalibrationData.from_corpus(tok, n_samples=16, seq_len=32, seed=2)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert a.fingerprint != c.fingerprint and a.texts_sha256 != c.texts_sha256
    assert a.fingerprint == batches_fingerprint(a.batches)
    assert a.to("cpu").fingerprint == a.fingerprint
    assert CalibrationData.from_corpus(tok, n_samples=16, seq_len=31, seed=1).fingerprint != a.fingerprint
    meta = a.metadata()
    json.dumps(meta)
    assert meta["source"].startswith("builtin:calibration@") and meta["seed"] == 1


def test_fingerprint_sees_one_changed_token(tok) -> None:  # type: ignore[no-untyped-def]
    a = CalibrationData.from_corpus(tok, n_samples=4, seq_len=16, batch_size=4)
    changed = {k: v.clone() for k, v in a[0].items()}
    changed["input_ids"][2, 3] += 1
    assert batches_fingerprint([changed]) != a.fingerprint


def test_batches_run_through_the_model(tok) -> None:  # type: ignore[no-untyped-def]
    model = transformers.AutoModel.from_pretrained(str(default_model_path()), local_files_only=True)
    data = CalibrationData.from_corpus(tok, n_samples=4, seq_len=16, batch_size=4)
    with torch.inference_mode():
        out = model(**data[0])
    assert out.last_hidden_state.shape[:2] == data[0]["input_ids"].shape


def test_text_file_paragraphs_and_jsonl(tmp_path: Path, tok) -> None:  # type: ignore[no-untyped-def]
    txt = tmp_path / "a.txt"
    txt.write_text("First paragraph\nspans two lines.\n\n\nSecond one.\n\n  \n")
    assert read_text_file(txt) == ["First paragraph spans two lines.", "Second one."]
    jl = tmp_path / "b.jsonl"
    jl.write_text('{"text": "alpha beta"}\n\n{"text": "gamma"}\n')
    assert load_texts(jl) == ["alpha beta", "gamma"]
    from allocator.model.data.domains import builtin_texts

    assert load_texts(None, "evaluation") == builtin_texts("evaluation")  # the mix of every domain
    assert load_texts("builtin:docs", "evaluation") == corpus_texts("evaluation")
    assert CalibrationData.from_path("builtin:prose", tok, n_samples=2, seq_len=16).source.startswith(
        "builtin:prose:calibration@")
    data = CalibrationData.from_path(txt, tok, n_samples=8, seq_len=16)
    assert data.n_samples == 2 and data.source == "file:a.txt"


def test_errors(tmp_path: Path, tok) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidParameterError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(InvalidParameterError, match="holds no text"):
        CalibrationData.from_path(empty, tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(InvalidParameterError, match='no string "text"'):
        read_text_file(bad)
    with pytest.raises(InvalidParameterError, match="no texts"):
        CalibrationData.from_texts(["", "  "], tok)
    with pytest.raises(InvalidParameterError, match="seq_len"):
        CalibrationData.from_texts(["hello"], tok, seq_len=1)
    with pytest.raises(InvalidParameterError, match="give no token sequences"):
        CalibrationData.from_texts(["hello"], tok, seq_len=64, pack=True)
    with pytest.raises(InvalidParameterError, match="at least one batch"):
        CalibrationData(batches=(), n_samples=0, seq_len=8, batch_size=1, seed=0)


def test_import_allocator_data_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, allocator.model.data, allocator.model.loading; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
