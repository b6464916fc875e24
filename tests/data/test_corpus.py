"""Built-in corpus: determinism, disjoint splits, fingerprints, errors."""

from __future__ import annotations

import collections
import subprocess
import sys

import pytest

from allocator.core.errors import InvalidParameterError
from allocator.model.data import corpus
from allocator.model.data.corpus import (
    CORPUS_MODULES,
    SPLITS,
    corpus_documents,
    corpus_fingerprint,
    corpus_texts,
    split_of,
    texts_fingerprint,
)


def test_module_list_has_no_duplicates_or_private_modules() -> None:
    assert len(set(CORPUS_MODULES)) == len(CORPUS_MODULES)
    assert not [m for m in CORPUS_MODULES if any(p.startswith("_") for p in m.split("."))]


def test_documents_are_clean_unique_and_hash_ordered() -> None:
    docs = corpus_documents()
    assert len(docs) > 1500
    assert len(set(docs)) == len(docs)
    for d in docs:
        assert len(d.split()) >= corpus.MIN_WORDS
        assert d == " ".join(d.split())  # whitespace normalised
        assert ">>>" not in d
    keys = [corpus._sha(d) for d in docs]  # canonical order
    assert keys == sorted(keys)


def test_splits_are_disjoint_and_cover_the_corpus() -> None:
    parts = {s: set(corpus_texts(s)) for s in SPLITS}
    assert parts["train"].isdisjoint(parts["calibration"])
    assert parts["train"].isdisjoint(parts["evaluation"])
    assert parts["calibration"].isdisjoint(parts["evaluation"])
    assert set().union(*parts.values()) == set(corpus_documents())
    for s, texts in parts.items():
        assert all(split_of(t) == s for t in texts)
    # shares roughly 70/15/15
    n = len(corpus_documents())
    assert 0.6 < len(parts["train"]) / n < 0.8
    assert len(parts["calibration"]) > 200 and len(parts["evaluation"]) > 200


def test_split_of_depends_on_text_only() -> None:
    counts = collections.Counter(split_of(f"document number {i}") for i in range(2000))
    assert set(counts) == set(SPLITS)
    assert split_of("same text") == split_of("same text")


def test_sampling_is_seeded_and_prefix_stable() -> None:
    a = corpus_texts("calibration", 50, seed=3)
    assert a == corpus_texts("calibration", 50, seed=3)
    assert a != corpus_texts("calibration", 50, seed=4)
    assert corpus_texts("calibration", 80, seed=3)[:50] == a
    assert sorted(corpus_texts("evaluation", seed=1)) == sorted(corpus_texts("evaluation", seed=2))


def test_same_corpus_in_a_fresh_interpreter_with_other_hash_seed() -> None:
    code = ("from allocator.model.data.corpus import corpus_fingerprint, corpus_texts;"
            "print(corpus_fingerprint(), corpus_texts('train', 5, seed=7)[0][:40])")
    out = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
           for seed in ("1", "2")]
    assert out[0] == out[1]
    assert out[0].split()[0] == corpus_fingerprint()


def test_fingerprints() -> None:
    fp = {s: corpus_fingerprint(s) for s in SPLITS}
    assert len(set(fp.values())) == 3 and all(len(v) == 64 for v in fp.values())
    assert corpus_fingerprint() == texts_fingerprint(corpus_documents())
    # boundaries count: the same characters split differently differ
    assert texts_fingerprint(["ab", "c"]) != texts_fingerprint(["a", "bc"])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_n(bad: object) -> None:
    with pytest.raises(InvalidParameterError, match="n must be"):
        corpus_texts("calibration", bad)  # type: ignore[arg-type]


def test_too_many_and_unknown_split() -> None:
    with pytest.raises(InvalidParameterError, match="lower n"):
        corpus_texts("evaluation", 10**6)
    with pytest.raises(InvalidParameterError, match="unknown corpus split 'test'"):
        corpus_texts("test")
