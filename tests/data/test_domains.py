"""The built-in corpus by domain: sizes, disjoint splits, the mix, fingerprints, provenance."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from allocator.core.errors import InvalidParameterError
from allocator.model.data import _domain_sources, domains
from allocator.model.data.domains import (
    DOMAINS,
    builtin_fingerprint,
    builtin_texts,
    corpus_provenance,
    domain_documents,
    domain_split_of,
    mixed_texts,
    parse_builtin,
    present_domains,
)

#: run's defaults: 32 calibration texts, 128 evaluation texts (one text per sample for encoders)
DEFAULT_CALIB, DEFAULT_EVAL = 32, 128

#: the domains read from the operating system's gettext catalogs, not from Python packages
OS_DOMAINS = ("instructions", "multilingual")
#: tests of those domains' content run where the catalogs are (Debian / Ubuntu with locales)
needs_catalogs = pytest.mark.skipif(
    not set(OS_DOMAINS) <= set(present_domains()),
    reason=f"no gettext catalogs in {_domain_sources.CATALOG_DIRS}: the {OS_DOMAINS} domains are "
           "empty on this machine (the mix uses the others)")


def _clear() -> None:
    for f in (domains._collected, domains._domain_split, domains._mix):
        f.cache_clear()


@pytest.fixture
def fresh_caches() -> Iterator[None]:
    _clear()
    yield
    _clear()


def test_every_domain_has_enough_text_for_the_default_sample_counts() -> None:
    assert set(DOMAINS) - set(OS_DOMAINS) <= set(present_domains())  # from Python packages
    for d in present_domains():
        assert len(builtin_texts("calibration", d)) >= 4 * DEFAULT_CALIB, d
        assert len(builtin_texts("evaluation", d)) >= DEFAULT_EVAL, d
        words = sum(len(t.split()) for t in builtin_texts("evaluation", d))
        assert words >= 10 * DEFAULT_EVAL, d  # ≥ 128 packed windows of 128 tokens need ~ this


def test_splits_are_disjoint_and_cover_each_domain() -> None:
    for d in present_domains():
        docs = set(domain_documents(d))
        parts = {s: set(builtin_texts(s, d)) for s in ("calibration", "evaluation")}
        assert not parts["calibration"] & parts["evaluation"], d
        if d != "docs":  # 50 / 50 split: no train share
            assert parts["calibration"] | parts["evaluation"] == docs
            assert 0.4 < len(parts["calibration"]) / len(docs) < 0.6
        assert all(domain_split_of(t, d) == "evaluation" for t in parts["evaluation"])
    # no text is shared between domains, so cross-domain evaluation is held out
    for i, a in enumerate(present_domains()):
        for b in present_domains()[i + 1:]:
            assert not set(domain_documents(a)) & set(domain_documents(b)), (a, b)


def test_the_mix_takes_equal_counts_of_every_domain_and_only_calibration_text() -> None:
    mix = builtin_texts("calibration")
    held = set(builtin_texts("evaluation"))
    assert not set(mix) & held
    per_domain = {d: len(set(mix) & set(domain_documents(d))) for d in present_domains()}
    assert len(set(per_domain.values())) == 1 and len(mix) == sum(per_domain.values())
    assert per_domain["docs"] == len(builtin_texts("calibration", "docs"))  # the smallest
    assert builtin_texts("calibration", n=40, seed=1) == builtin_texts("calibration", n=60, seed=1)[:40]
    without_code = set(mixed_texts("calibration", [d for d in present_domains() if d != "code"]))
    assert not without_code & set(domain_documents("code")) and without_code < set(mix) | without_code


def test_documents_are_bounded_and_code_keeps_its_layout_without_docstrings() -> None:
    for d in ("prose", "instructions", "multilingual"):
        for t in domain_documents(d):
            assert _domain_sources.MIN_WORDS <= _domain_sources._words(t) <= 2 * _domain_sources.MAX_WORDS
            assert t == " ".join(t.split())
    code = domain_documents("code")
    assert all(_domain_sources.MIN_CODE_LINES <= len(t.splitlines()) <= _domain_sources.MAX_CODE_LINES
               for t in code)
    assert sum(t.startswith(("def ", "async def ", "@")) for t in code) > 0.5 * len(code)
    docstring_starts = {t[:60] for t in domain_documents("docs")}
    assert not any(line.strip().strip('"').strip()[:60] in docstring_starts
                   for t in code[:300] for line in t.splitlines() if line.strip().startswith('"""'))


@needs_catalogs
def test_multilingual_holds_several_scripts_and_languages() -> None:
    texts = domain_documents("multilingual")
    scripts = {"cjk": r"[\u3040-\u30ff\u4e00-\u9fff]", "cyrillic": r"[\u0400-\u04ff]",
               "accented latin": r"[àâçéèêëîïôûùüÿñæœäöüßãõ]"}
    for name, pat in scripts.items():
        assert sum(bool(re.search(pat, t)) for t in texts) > 200, name
    langs = {s["kind"] for s in corpus_provenance()["multilingual"]["sources"]}
    assert len(langs) >= 6


def test_provenance_names_package_version_and_path_of_every_part() -> None:
    prov = corpus_provenance()
    for d in present_domains():
        assert prov[d]["sources"], d
        for src in prov[d]["sources"]:
            assert src["package"] and src["path"] and src["kind"], (d, src)
        assert prov[d]["documents"] == len(domain_documents(d))
        assert sum(prov[d]["splits"].values()) == prov[d]["documents"]
    pkgs = {s["package"] for s in prov["prose"]["sources"]}
    assert {"numpy", "scikit-learn"} <= pkgs
    assert all(s["version"] for s in prov["prose"]["sources"])
    assert prov["mix"]["calibration"]["domains"] == list(present_domains())
    json.dumps(prov)


def test_fingerprints_are_deterministic_across_processes() -> None:
    code = ("from allocator.model.data.domains import builtin_fingerprint as f, builtin_texts as t;"
            "print(f('calibration'), f('evaluation', 'code'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=300).stdout.split()
    assert out[0] == builtin_fingerprint("calibration")
    assert out[1] == builtin_fingerprint("evaluation", "code")


@needs_catalogs
def test_fingerprint_changes_when_one_domain_changes(monkeypatch: pytest.MonkeyPatch,
                                                    fresh_caches: None) -> None:
    before = builtin_fingerprint("calibration")
    docs_fp, prose_fp = builtin_fingerprint("calibration", "docs"), builtin_fingerprint(None, "prose")
    texts, found = _domain_sources.collect_prose()
    used = builtin_texts("calibration", "prose")  # one text the mix takes from prose, edited
    first = next(t for t in domains._domain_split("prose", "calibration"))
    assert first in used
    edited = [t + " Edited." if t == first else t for t in texts]
    monkeypatch.setitem(domains._COLLECTORS, "prose", lambda: (edited, found))
    _clear()
    after = builtin_fingerprint("calibration")
    assert builtin_fingerprint("calibration", "docs") == docs_fp
    assert builtin_fingerprint(None, "prose") != prose_fp and after != before
    # a domain with no text here is left out of the mix, and the fingerprint says so
    monkeypatch.setitem(domains._COLLECTORS, "multilingual", lambda: ([], []))
    _clear()
    assert "multilingual" not in present_domains()
    assert builtin_fingerprint("calibration") != after
    with pytest.raises(InvalidParameterError, match="no text"):
        builtin_texts("calibration", "multilingual")


def test_builtin_spellings() -> None:
    assert parse_builtin("builtin") == (True, None) and parse_builtin("builtin:mix") == (True, None)
    assert parse_builtin("builtin:code") == (True, "code")
    assert parse_builtin("my.txt") == (False, None) and parse_builtin(None) == (False, None)
    with pytest.raises(InvalidParameterError, match="unknown corpus domain"):
        parse_builtin("builtin:poetry")
    with pytest.raises(InvalidParameterError, match="unknown corpus split"):
        builtin_texts("test", "code")


def test_user_data_picks_a_domain_for_calibration_and_evaluation() -> None:
    pytest.importorskip("torch")
    from allocator.model.data import data_description, user_data_for
    from allocator.model.loading import load_model

    lm = load_model("tiny-llama")
    common = {"seq_len": 32, "batch_size": 4}
    default = user_data_for(lm, "calibration", 4, **common)
    assert default.source.startswith("builtin:calibration@")
    assert default.source.endswith(builtin_fingerprint("calibration")[:16])
    cal = user_data_for(lm, "calibration", 4, data="builtin:code", **common)
    held = user_data_for(lm, "evaluation", 4, data="builtin:code", **common)
    assert cal.source.startswith("builtin:code:calibration@")
    assert held.source.startswith("builtin:code:evaluation@")
    other = user_data_for(lm, "evaluation", 4, data="builtin:code", eval_data="builtin:prose", **common)
    assert other.source.startswith("builtin:prose:evaluation@")
    words = data_description("builtin:code", "builtin:prose")
    assert "'code'" in words["calibration"] and "'prose'" in words["evaluation"]
    assert "no text shared" in words["evaluation"]
    assert "mix of every domain" in data_description(None, None)["calibration"]


def test_the_code_domain_is_cached_on_disk_and_a_bad_cache_is_ignored(
        monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    from pathlib import Path

    monkeypatch.setenv("BITALLOC_CACHE_DIR", str(tmp_path))
    fresh = domains._code_domain()
    path = domains._code_cache_path()
    assert path.is_file() and str(path).startswith(str(tmp_path))
    calls: list[int] = []
    real = _domain_sources.collect_code
    monkeypatch.setattr(_domain_sources, "collect_code", lambda: (calls.append(1), real())[1])
    assert domains._code_domain() == fresh and not calls  # read from the cache
    Path(path).write_text("{not json", encoding="utf-8")
    assert domains._code_domain() == fresh and calls == [1]  # collected afresh, cache rewritten
    assert domains._code_domain() == fresh and calls == [1]
