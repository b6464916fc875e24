"""Collect cleaned docstrings of a fixed list of standard-library modules (stdlib only).

Run as a script in an isolated interpreter (``python -I -S _stdlib_docs.py``) it prints the
documents as a JSON list: no site-packages, no ``sitecustomize`` and no third-party import can
patch the standard library first (transformers, for one, adds methods to ``logging.Logger``), so
the corpus depends on the Python version alone. Keep this file free of non-stdlib imports.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from collections.abc import Iterator
from typing import Any

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


def collect_documents() -> list[str]:
    """Unique cleaned docstrings with at least ``MIN_WORDS`` words (unordered)."""
    seen: set[str] = set()
    for modname in CORPUS_MODULES:
        for raw in _module_docs(modname):
            text = _clean(raw)
            if len(text.split()) >= MIN_WORDS:
                seen.add(text)
    return sorted(seen)


if __name__ == "__main__":
    sys.stdout.write(json.dumps(collect_documents()))
