"""The built-in corpus by domain, and the default calibration mix of all of them.

Five domains of real text already on the machine (nothing downloaded, nothing generated):

============  ===============================================================================
``docs``      technical text: standard-library docstrings (:mod:`allocator.model.data.corpus`)
``code``      Python source: functions and methods of standard-library modules, docstrings removed
``prose``     English prose: descriptions and licences of the installed dependencies,
              scikit-learn's dataset descriptions, Python's licence history, the MiniLM model card
``instructions``  English help / usage messages of GNU programs (the msgids of their gettext
              catalogs, shipped with the operating system, e.g. Debian's ``bash``, ``git``, ``tar``)
``multilingual``  translations of coreutils' messages into de, es, fr, it, ja, pt_BR, ru, zh_CN
              (the msgstrs of its gettext catalogs)
============  ===============================================================================

Each document belongs to one split by the hash of its text (``domain_split_of``): ``docs`` keeps
its 70 / 15 / 15 % train / calibration / evaluation shares (the tiny LM was trained on its
``train`` split); the other domains are split 50 / 50 into calibration and evaluation. Splits are
disjoint by construction and a text keeps its split when others appear or disappear.

The default set (``domain=None``, spelt ``builtin`` on the command line) mixes every non-empty
domain in equal document counts: from each domain the first ``k`` documents of the split in
hash order, ``k`` the size of the smallest non-empty domain's split. A domain with no text on
this machine (``instructions`` / ``multilingual`` without gettext catalogs) is left out and the
fingerprint says so. ``builtin:DOMAIN`` picks one domain.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from allocator.core.errors import InvalidParameterError
from allocator.model.data import _domain_sources as sources
from allocator.model.data.corpus import SPLIT_SHARES, SPLITS, Split, corpus_documents, texts_fingerprint

__all__ = ["BUILTIN", "DOMAINS", "DOMAIN_SHARES", "builtin_fingerprint", "builtin_label",
           "builtin_texts", "corpus_provenance", "domain_documents", "domain_split_of",
           "mixed_texts", "parse_builtin", "present_domains"]

log = logging.getLogger(__name__)

#: the spelling of the built-in corpus where a file is expected (``--data builtin:code``)
BUILTIN = "builtin"
DOMAINS: tuple[str, ...] = ("docs", "code", "prose", "instructions", "multilingual")
_HELD_OUT_SHARES: dict[Split, int] = {"train": 0, "calibration": 50, "evaluation": 50}
#: split shares (percent of the text-hash buckets) of each domain
DOMAIN_SHARES: dict[str, dict[Split, int]] = {
    d: (dict(SPLIT_SHARES) if d == "docs" else dict(_HELD_OUT_SHARES)) for d in DOMAINS}

_DESCRIPTIONS: dict[str, str] = {
    "docs": "technical text: docstrings of standard-library modules",
    "code": "Python source of standard-library functions and methods, docstrings removed",
    "prose": "English prose: descriptions and licences of installed dependencies, scikit-learn's "
             "dataset descriptions, Python's licence history, the MiniLM model card",
    "instructions": "English help and usage messages of GNU programs (gettext msgids)",
    "multilingual": "coreutils' messages translated into de, es, fr, it, ja, pt_BR, ru, zh_CN "
                    "(gettext msgstrs)",
}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _docs_domain() -> tuple[list[str], list[dict[str, str]]]:
    from allocator.model.data._stdlib_docs import CORPUS_MODULES

    return list(corpus_documents()), [{"package": "python (standard library)",
                                       "version": sys.version.split()[0],
                                       "path": f"docstrings of {len(CORPUS_MODULES)} modules "
                                               f"(CORPUS_MODULES)", "kind": "docstrings"}]


def _code_cache_path() -> Path:
    """Where the ``code`` domain is cached: keyed by the collector's own source, the Python
    version and the size and mtime of every file it reads, so any change collects it afresh."""
    from allocator.model.smollm2 import cache_root

    sig = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in sources.code_files()]
    key = hashlib.sha256(json.dumps([Path(sources.__file__).read_bytes().hex(), sys.version, sig])
                         .encode("utf-8")).hexdigest()[:24]
    return cache_root() / "corpus" / f"code-{key}.json"


def _code_domain() -> tuple[list[str], list[dict[str, str]]]:
    """``collect_code`` through an on-disk cache (parsing ~100 files costs ~2 s of CPU)."""
    from allocator.core.atomic import atomic_write_text

    try:
        path: Path | None = _code_cache_path()
    except OSError:
        path = None
    if path is not None and path.is_file():
        try:
            got = json.loads(path.read_text(encoding="utf-8"))
            docs, found = got["documents"], got["sources"]
            if all(isinstance(t, str) for t in docs) and all(isinstance(x, dict) for x in found):
                return list(docs), [dict(x) for x in found]
        except (OSError, ValueError, KeyError, TypeError):
            log.debug("ignoring the unreadable corpus cache %s", path)
    texts, found = sources.collect_code()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"documents": texts, "sources": found}))
        except OSError as e:  # a read-only home: collect every time
            log.debug("cannot cache the code corpus at %s: %s", path, e)
    return texts, found


_COLLECTORS: dict[str, Callable[[], tuple[list[str], list[dict[str, str]]]]] = {
    "docs": _docs_domain,
    "code": _code_domain,
    "prose": sources.collect_prose,
    "instructions": sources.collect_instructions,
    "multilingual": sources.collect_multilingual,
}


def _check_domain(domain: str) -> str:
    if domain not in DOMAINS:
        raise InvalidParameterError(f"unknown corpus domain {domain!r}; use one of "
                                    f"{', '.join(DOMAINS)} (or {BUILTIN} for the mix)")
    return domain


def _check_split(split: str) -> Split:
    if split not in SPLITS:
        raise InvalidParameterError(f"unknown corpus split {split!r}; use one of {', '.join(SPLITS)}")
    return split


@functools.cache
def _collected(domain: str) -> tuple[tuple[str, ...], tuple[dict[str, str], ...]]:
    texts, found = _COLLECTORS[domain]()
    docs = tuple(sorted(set(texts), key=_sha))
    if not docs:
        log.warning("the built-in corpus domain %r has no text on this machine (%s); it is left "
                    "out of the default mix", domain, _DESCRIPTIONS[domain])
    return docs, tuple(found)


def domain_documents(domain: str) -> tuple[str, ...]:
    """Every document of ``domain`` (all splits), ordered by the sha256 of its text; cached."""
    return _collected(_check_domain(domain))[0]


def domain_split_of(text: str, domain: str) -> Split:
    """The split of a ``domain`` text: bucket ``int(sha256("split:" + text)[:8], 16) mod 100``
    against the domain's cumulative ``DOMAIN_SHARES`` (the ``docs`` rule of ``split_of``)."""
    bucket = int(_sha("split:" + text)[:8], 16) % 100
    edge = 0
    for split in SPLITS:
        edge += DOMAIN_SHARES[_check_domain(domain)][split]
        if bucket < edge:
            return split
    raise AssertionError("DOMAIN_SHARES must sum to 100")  # pragma: no cover


@functools.cache
def _domain_split(domain: str, split: Split) -> tuple[str, ...]:
    return tuple(t for t in domain_documents(domain) if domain_split_of(t, domain) == split)


@functools.cache
def _mix(split: Split, domains: tuple[str, ...] = DOMAINS) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(texts of the mix of ``domains`` in canonical order, the non-empty domains in it)."""
    parts = {d: _domain_split(_check_domain(d), split) for d in domains}
    present = tuple(d for d in domains if parts[d])
    if not present:
        raise InvalidParameterError(f"the built-in corpus has no {split!r} text of "
                                    f"{', '.join(domains)} on this machine; pass your own text file")
    k = min(len(parts[d]) for d in present)
    texts = tuple(sorted({t for d in present for t in parts[d][:k]}, key=_sha))
    return texts, present


def mixed_texts(split: str, domains: Sequence[str], *, seed: int = 0) -> list[str]:
    """The texts of ``split`` of the mix of ``domains`` (equal document counts from each non-empty
    one, as the default mix takes them from all), in a seeded order."""
    texts = list(_mix(_check_split(split), tuple(dict.fromkeys(domains)))[0])
    random.Random(seed).shuffle(texts)
    return texts


def present_domains(split: str = "calibration") -> tuple[str, ...]:
    """The domains with text of ``split`` on this machine (those in the default mix)."""
    return _mix(_check_split(split))[1]


def _texts_of(split: str, domain: str | None) -> tuple[str, ...]:
    s = _check_split(split)
    return _mix(s)[0] if domain is None else _domain_split(_check_domain(domain), s)


def builtin_texts(split: str = "calibration", domain: str | None = None, n: int | None = None, *,
                  seed: int = 0) -> list[str]:
    """``n`` texts (all when None) of ``split`` of one domain, or of the mix when ``domain`` is
    None, in a seeded order; a larger ``n`` extends a smaller one.

    Raises:
        InvalidParameterError: an unknown split or domain, a domain without text here, ``n``
            larger than the split.
    """
    texts = list(_texts_of(split, domain))
    label = builtin_label(split, domain)
    if not texts:
        raise InvalidParameterError(f"{label} has no text on this machine "
                                    f"({_DESCRIPTIONS[str(domain)]}); pick another domain")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidParameterError(f"n must be a positive int or None; got {n!r}")
        if n > len(texts):
            raise InvalidParameterError(f"{label} has {len(texts)} texts but n={n} were asked; "
                                        f"lower n or pass your own text file")
    random.Random(seed).shuffle(texts)
    return texts if n is None else texts[:n]


def builtin_fingerprint(split: str | None = None, domain: str | None = None) -> str:
    """sha256 of the texts of ``split`` (every split when None) of ``domain`` or of the mix, in
    canonical order."""
    if split is None:
        splits: Sequence[str] = SPLITS
        return texts_fingerprint([builtin_fingerprint(s, domain) for s in splits])
    return texts_fingerprint(_texts_of(split, domain))


def builtin_label(split: str, domain: str | None = None) -> str:
    """``builtin:SPLIT`` for the mix, ``builtin:DOMAIN:SPLIT`` for one domain."""
    return f"{BUILTIN}:{split}" if domain is None else f"{BUILTIN}:{domain}:{split}"


def parse_builtin(spec: object) -> tuple[bool, str | None]:
    """``(True, domain)`` when ``spec`` names the built-in corpus (``builtin`` → the mix, domain
    None; ``builtin:DOMAIN``), ``(False, None)`` for anything else (a file path).

    Raises:
        InvalidParameterError: ``builtin:`` followed by an unknown domain.
    """
    if not isinstance(spec, str) or not (spec == BUILTIN or spec.startswith(BUILTIN + ":")):
        return False, None
    rest = spec[len(BUILTIN) + 1:]
    if not rest or rest == "mix":
        return True, None
    return True, _check_domain(rest)


def corpus_provenance() -> dict[str, Any]:
    """Where every domain's text comes from, its size per split and fingerprints (JSON-able)."""
    out: dict[str, Any] = {}
    for d in DOMAINS:
        docs, found = _collected(d)
        out[d] = {"description": _DESCRIPTIONS[d], "documents": len(docs),
                  "splits": {s: len(_domain_split(d, s)) for s in SPLITS},
                  "sha256": texts_fingerprint(docs), "sources": [dict(x) for x in found]}
    mix = {s: {"texts": len(_mix(s)[0]), "domains": list(_mix(s)[1]),
               "sha256": texts_fingerprint(_mix(s)[0])} for s in ("calibration", "evaluation")}
    out["mix"] = mix
    return out
