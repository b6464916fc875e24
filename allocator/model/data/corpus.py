"""The ``docs`` domain of the built-in corpus: docstrings of a fixed list of standard-library modules.

It is one of the five domains of :mod:`allocator.model.data.domains`, whose mix is the default
calibration and evaluation set; the ``train`` split here is what the bundled tiny LM was trained on.

Every machine with Python has it, so calibration and evaluation work offline with no download.
A *document* is one docstring (module, public class, public function or public method defined
in that module), with doctest / code lines dropped and whitespace normalised to single spaces;
documents with fewer than ``MIN_WORDS`` words are skipped and duplicates kept once.

Determinism: modules are walked in the listed order and members in sorted-name order, and the
final list is ordered by the sha256 of each text, so neither filesystem nor dict order matters.
Splits are assigned by hashing the text (``split_of``), so they are disjoint by construction
and a document keeps its split when other documents appear or disappear. Docstrings change a
little between Python versions: ``corpus_fingerprint`` is the sha256 of the exact texts used,
to record in metadata.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import subprocess
import sys
from collections.abc import Sequence
from typing import Literal

from allocator.core.errors import InvalidParameterError
from allocator.model.data import _stdlib_docs
from allocator.model.data._stdlib_docs import CORPUS_MODULES, MIN_WORDS

__all__ = [
    "CORPUS_MODULES",
    "MIN_WORDS",
    "SPLITS",
    "SPLIT_SHARES",
    "Split",
    "corpus_documents",
    "corpus_fingerprint",
    "corpus_texts",
    "split_of",
    "texts_fingerprint",
]

Split = Literal["train", "calibration", "evaluation"]
SPLITS: tuple[Split, ...] = ("train", "calibration", "evaluation")
# Shares out of 100 buckets of the text hash: train 70 %, calibration 15 %, evaluation 15 %.
SPLIT_SHARES: dict[Split, int] = {"train": 70, "calibration": 15, "evaluation": 15}

log = logging.getLogger(__name__)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.cache
def corpus_documents() -> tuple[str, ...]:
    """Every document of the corpus (all splits), ordered by the sha256 of its text; cached.

    Collected in a fresh isolated interpreter (``python -I -S``) so that libraries imported in
    this process (which may patch stdlib classes) cannot change the texts; in-process only when
    no interpreter can be started (a frozen application), with a warning.
    """
    docs: list[str] | None = None
    try:
        proc = subprocess.run([sys.executable, "-I", "-S", "-W", "ignore", _stdlib_docs.__file__],
                              capture_output=True, timeout=300, check=True)
        loaded = json.loads(proc.stdout.decode("utf-8"))
        if isinstance(loaded, list) and all(isinstance(t, str) for t in loaded):
            docs = loaded
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        log.warning("collecting the corpus in a clean interpreter failed (%s); collecting "
                    "in-process, where imported libraries may alter a few docstrings", e)
    if docs is None:
        docs = _stdlib_docs.collect_documents()
    return tuple(sorted(set(docs), key=_sha))


def split_of(text: str) -> Split:
    """The split a document belongs to: bucket ``int(sha256("split:" + text)) mod 100``."""
    bucket = int(_sha("split:" + text)[:8], 16) % 100
    edge = 0
    for split in SPLITS:
        edge += SPLIT_SHARES[split]
        if bucket < edge:
            return split
    raise AssertionError("SPLIT_SHARES must sum to 100")  # pragma: no cover


@functools.cache
def _split_documents(split: Split) -> tuple[str, ...]:
    return tuple(t for t in corpus_documents() if split_of(t) == split)


def _check_split(split: str) -> Split:
    if split not in SPLITS:
        raise InvalidParameterError(
            f"unknown corpus split {split!r}; use one of {', '.join(SPLITS)}")
    return split


def _docs_of(split: str | None, documents: Sequence[str] | None) -> tuple[str, ...]:
    if documents is None:
        return corpus_documents() if split is None else _split_documents(_check_split(split))
    canon = tuple(sorted(set(documents), key=_sha))
    return canon if split is None else tuple(t for t in canon if split_of(t) == _check_split(split))


def corpus_texts(split: str = "calibration", n: int | None = None, *, seed: int = 0,
                 documents: Sequence[str] | None = None) -> list[str]:
    """``n`` documents of ``split`` (all when ``n`` is None) in a seeded random order.

    The same (split, n, seed) gives the same list on the same Python version; a larger ``n``
    extends a smaller one (the first ``n`` of one seeded permutation). ``documents`` replaces
    the collected corpus (e.g. the JSON ``_stdlib_docs.py`` printed under another Python).
    """
    docs = list(_docs_of(split, documents))
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidParameterError(f"n must be a positive int or None; got {n!r}")
        if n > len(docs):
            raise InvalidParameterError(
                f"the built-in {split!r} split has {len(docs)} texts but n={n} were asked; "
                f"lower n or pass your own text file")
    random.Random(seed).shuffle(docs)
    return docs if n is None else docs[:n]


def texts_fingerprint(texts: Sequence[str]) -> str:
    """sha256 (hex) of the texts in order, each length-prefixed so boundaries count."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def corpus_fingerprint(split: str | None = None, *,
                       documents: Sequence[str] | None = None) -> str:
    """sha256 of the documents of ``split`` (or of the whole corpus) in canonical order."""
    return texts_fingerprint(_docs_of(split, documents))
