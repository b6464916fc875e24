"""Built-in English corpus: docstrings of a fixed list of Python standard-library modules.

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
import importlib
import inspect
import random
import re
from collections.abc import Iterator
from typing import Any, Literal

from allocator.errors import InvalidParameterError

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
MIN_WORDS = 12

# Modules present on CPython 3.11-3.13 on every platform (no removed-in-3.13 modules, no
# platform-only ones such as winreg or fcntl), chosen for prose-rich docstrings.
CORPUS_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "builtins", "bz2", "calendar",
    "cmd", "codecs", "collections", "colorsys", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis",
    "email", "email.message", "email.utils", "enum", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq",
    "hmac", "html", "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib",
    "importlib", "inspect", "io", "ipaddress", "itertools", "json", "keyword", "linecache",
    "locale", "logging", "logging.handlers", "lzma", "mailbox", "mimetypes", "modulefinder",
    "multiprocessing", "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile",
    "pstats", "py_compile", "pydoc", "queue", "quopri", "random", "re", "reprlib", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "sqlite3", "statistics", "string", "struct", "subprocess", "symtable", "sysconfig",
    "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "turtle", "types", "typing", "unittest", "unittest.mock", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "webbrowser", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zipimport",
    "asyncio.base_events", "asyncio.events", "asyncio.futures", "asyncio.locks",
    "asyncio.queues", "asyncio.streams", "asyncio.subprocess", "asyncio.tasks", "code", "codeop",
    "collections.abc", "compileall", "concurrent.futures.process", "concurrent.futures.thread",
    "contextvars", "ctypes", "doctest", "email.charset", "email.feedparser", "email.generator",
    "email.header", "email.headerregistry", "email.parser", "email.policy", "ensurepip",
    "graphlib", "http.cookies", "importlib.abc", "importlib.metadata", "importlib.resources",
    "importlib.util", "json.decoder", "json.encoder", "logging.config", "multiprocessing.connection",
    "multiprocessing.managers", "multiprocessing.pool", "multiprocessing.queues", "runpy", "stat",
    "tomllib", "tracemalloc", "unittest.case", "unittest.loader", "unittest.result",
    "unittest.runner", "unittest.suite", "urllib.robotparser", "venv", "xml.dom.pulldom",
    "xml.sax", "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader", "zoneinfo",
)

_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.(\s|$)|\$ |#|[-=~*]{3,}\s*$)")
_WS = re.compile(r"\s+")


def _clean(doc: str) -> str:
    """Drop doctest/code/underline lines, collapse whitespace to single spaces."""
    kept = [ln for ln in inspect.cleandoc(doc).splitlines() if not _CODE_LINE.match(ln)]
    return _WS.sub(" ", " ".join(kept)).strip()


def _own_doc(obj: Any) -> str | None:
    doc = getattr(obj, "__doc__", None)  # not inspect.getdoc: it inherits base-class docs
    return doc if isinstance(doc, str) else None


def _public_members(mod: Any) -> Iterator[Any]:
    """Public classes/functions defined in ``mod`` (sorted by name), then their methods."""
    for name in sorted(vars(mod)):
        if name.startswith("_"):
            continue
        obj = vars(mod)[name]
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != mod.__name__:  # skip re-exports
            continue
        yield obj
        if inspect.isclass(obj):
            for mname in sorted(vars(obj)):
                if mname.startswith("_"):
                    continue
                member = vars(obj)[mname]
                if isinstance(member, staticmethod | classmethod):
                    member = member.__func__
                if inspect.isroutine(member) or isinstance(member, property):
                    yield member


def _module_docs(modname: str) -> Iterator[str]:
    try:
        mod = importlib.import_module(modname)
    except ImportError:  # a stripped-down Python without e.g. sqlite3 or turtle (tkinter)
        return
    doc = _own_doc(mod)
    if doc:
        yield doc
    for obj in _public_members(mod):
        doc = _own_doc(obj)
        if doc:
            yield doc


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.cache
def corpus_documents() -> tuple[str, ...]:
    """Every document of the corpus (all splits), ordered by the sha256 of its text; cached."""
    seen: set[str] = set()
    for modname in CORPUS_MODULES:
        for raw in _module_docs(modname):
            text = _clean(raw)
            if len(text.split()) >= MIN_WORDS:
                seen.add(text)
    return tuple(sorted(seen, key=_sha))


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


def corpus_texts(split: str = "calibration", n: int | None = None, *, seed: int = 0) -> list[str]:
    """``n`` documents of ``split`` (all when ``n`` is None) in a seeded random order.

    The same (split, n, seed) gives the same list on the same Python version; a larger ``n``
    extends a smaller one (the first ``n`` of one seeded permutation).
    """
    docs = list(_split_documents(_check_split(split)))
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidParameterError(f"n must be a positive int or None; got {n!r}")
        if n > len(docs):
            raise InvalidParameterError(
                f"the built-in {split!r} split has {len(docs)} texts but n={n} were asked; "
                f"lower n or pass your own text file")
    random.Random(seed).shuffle(docs)
    return docs if n is None else docs[:n]


def texts_fingerprint(texts: list[str] | tuple[str, ...]) -> str:
    """sha256 (hex) of the texts in order, each length-prefixed so boundaries count."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def corpus_fingerprint(split: str | None = None) -> str:
    """sha256 of the documents of ``split`` (or of the whole corpus) in canonical order."""
    docs = corpus_documents() if split is None else _split_documents(_check_split(split))
    return texts_fingerprint(docs)
