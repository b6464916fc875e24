"""The layer rules of docs/architecture.md, checked on every module's imports (parsed with ast,
lazy imports inside functions included; ``if TYPE_CHECKING:`` imports excluded).

* each module imports only its own layer and the layers its layer may use (``ALLOWED``): core
  types import nothing above them, ``sensitivity`` and ``solvers`` never import each other, the
  backend imports neither;
* ``solvers`` (and the core) never import torch / transformers at module level, and importing
  ``allocator``, ``solvers`` or ``sensitivity`` loads no torch at all;
* nothing outside a package imports its private ``_modules`` (or private names);
* loggers are named after their module (``logging.getLogger(__name__)``: ``allocator.*``,
  ``sensitivity.*``, ``solvers.*``), except the HTTP service's operator-facing
  ``bitalloc.service*`` loggers.

A new module must be placed in a layer (``layer_of``); a violation that cannot be fixed yet goes
in ``KNOWN_EXCEPTIONS`` with the reason, never silently.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("allocator", "sensitivity", "solvers")

#: layer of every folder that holds modules, by path; no prefix rule and no catch-all, so a module
#: in a folder not listed here (a new package, a new sub-folder) has no layer and fails
#: ``test_every_module_has_a_layer`` until it is placed.
FOLDER_LAYERS: dict[str, str] = {
    # core types: formats, units, tables, budgets, plans, results, their files and table tools
    "allocator/core": "core",
    # the model side: loading, outputs, data, the quantizer, unit selection, saving
    "allocator/model": "model",
    "allocator/model/data": "model",
    "allocator/model/quant": "model",
    "allocator/model/quant/ggml": "model",
    "sensitivity": "estimators",
    "sensitivity/_curvature": "estimators",
    "solvers": "solvers",
    # apply / verify / evaluate a plan on a model, the search evaluator, exporters, palettes
    "allocator/backend": "backend",
    "allocator/export": "backend",
    # orchestration: run / demo, refinement, the Bayesian search job
    "allocator/jobs": "jobs",
    # entry points: CLI, HTTP service and its client; shipped test helpers
    "allocator/cli": "top",
    "allocator/service": "top",
    "allocator/service/api": "top",
    "allocator/service/api/routes": "top",
    "allocator/service/infra": "top",
    "allocator/service/store": "top",
    "allocator/testing": "top",
}

#: modules placed one by one: the top package only re-exports the core's public names, and its
#: folder holds every other package, so it cannot be placed by folder.
MODULE_LAYERS: dict[str, str] = {"allocator": "core"}

LAYER_NAMES = ("core", "model", "estimators", "solvers", "backend", "jobs", "top")

ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset({"core"}),
    "model": frozenset({"core", "model"}),
    "estimators": frozenset({"core", "model", "estimators"}),
    "solvers": frozenset({"core", "solvers"}),
    "backend": frozenset({"core", "model", "backend"}),
    "jobs": frozenset({"core", "model", "estimators", "solvers", "backend", "jobs"}),
    "top": frozenset(LAYER_NAMES),
}

#: Layers that must not import heavy packages at module level (a solver runs on a table alone,
#: e.g. inside the service; ``import allocator`` stays light).
NO_HEAVY_AT_IMPORT = frozenset({"core", "solvers"})
HEAVY = ("torch", "transformers")

#: (importer, imported) pairs allowed for now, each with why; keep this list short.
#: None today: add ("importer module", "imported module") with a comment saying why and how it
#: will be removed.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  #: the dotted name as written (module, or module.name for ``from m import name``)
    line: int
    top_level: bool  #: executed when the importer is imported (not in a function / TYPE_CHECKING)
    type_checking: bool = False  #: under ``if TYPE_CHECKING:`` (for annotations; still a dependency)


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if "migrations" in path.parts:  # alembic scripts, run by alembic only
                continue
            out[_module_name(path, root)] = path
    return out


MODULES = _modules()
#: benchmark scripts: not a layer, but they use the packages as a user would (public names only)
BENCHMARKS = {_module_name(p): p for p in sorted((ROOT / "benchmarks").glob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path) -> list[Import]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: list[Import] = []

    def visit(node: ast.AST, top: bool, checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.body:  # never executed, but the module depends on these names
                    visit_one(sub, False, True)
                for sub in child.orelse:
                    visit_one(sub, top, checking)
                continue
            visit_one(child, top, checking)

    def visit_one(child: ast.AST, top: bool, checking: bool) -> None:
        inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        if isinstance(child, ast.Import):
            found.extend(Import(name, a.name, child.lineno, top, checking) for a in child.names)
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                base = package.split(".")
                base = base[:len(base) - (child.level - 1)]
                module = ".".join(base + ([child.module] if child.module else []))
            else:
                module = child.module or ""
            found.append(Import(name, module, child.lineno, top, checking))
            found.extend(Import(name, f"{module}.{a.name}", child.lineno, top, checking)
                         for a in child.names)
        visit(child, inner, checking)

    visit(ast.parse(path.read_text(encoding="utf-8")), True, False)
    return found


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def layer_of(module: str, path: Path | None = None, root: Path = ROOT) -> str | None:
    """The layer of ``module`` (its file ``path``, by default the one in ``MODULES``): its entry
    in ``MODULE_LAYERS``, else its folder's in ``FOLDER_LAYERS``; None when neither places it."""
    if module in MODULE_LAYERS:
        return MODULE_LAYERS[module]
    path = path if path is not None else MODULES.get(module)
    if path is None:
        return None
    return FOLDER_LAYERS.get(path.parent.relative_to(root).as_posix())


def _unplaced(modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    return [m for m, path in modules.items() if layer_of(m, path, root) is None]


def _known_module(target: str) -> str | None:
    """The longest prefix of ``target`` that is one of our modules."""
    parts = target.split(".")
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts = parts[:-1]
    return None


def test_every_module_has_a_layer() -> None:
    missing = _unplaced(MODULES)
    assert not missing, (f"put the folders of these modules in FOLDER_LAYERS of tests/test_layers.py "
                         f"(and in docs/architecture.md): {missing}")


def test_a_module_outside_the_placed_folders_has_no_layer(tmp_path: Path) -> None:
    # the check itself: a tree with a module in a placed folder, a new sub-package, a stray
    # module beside the top package's __init__ and a new folder of a plug-in package
    for rel in ("allocator/__init__.py", "allocator/core/__init__.py", "allocator/core/fresh.py",
                "allocator/newpkg/__init__.py", "allocator/newpkg/thing.py", "allocator/stray.py",
                "sensitivity/__init__.py", "sensitivity/_sub/__init__.py", "solvers/__init__.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    modules = _modules(tmp_path)
    assert sorted(_unplaced(modules, tmp_path)) == [
        "allocator.newpkg", "allocator.newpkg.thing", "allocator.stray", "sensitivity._sub"]
    assert layer_of("allocator.core.fresh", modules["allocator.core.fresh"], tmp_path) == "core"
    assert layer_of("allocator", modules["allocator"], tmp_path) == "core"
    assert layer_of("allocator.nowhere") is None  # not a module of this tree


def test_the_layer_map_names_real_folders_and_layers() -> None:
    # a stale entry would place modules that no longer exist (or a typo, none at all)
    folders = {p.parent.relative_to(ROOT).as_posix() for p in MODULES.values()}
    assert sorted(set(FOLDER_LAYERS) - folders) == []
    assert set(FOLDER_LAYERS.values()) | set(MODULE_LAYERS.values()) <= set(LAYER_NAMES)
    assert set(ALLOWED) == set(LAYER_NAMES) and set(MODULE_LAYERS) <= set(MODULES)


def test_imports_respect_the_layers() -> None:
    bad = []
    for name, imports in IMPORTS.items():
        mine = layer_of(name)
        assert mine is not None
        for imp in imports:
            target = _known_module(imp.target)
            if target is None:
                continue
            theirs = layer_of(target)
            if theirs is not None and theirs not in ALLOWED[mine]:
                bad.append(f"{MODULES[name].relative_to(ROOT)}:{imp.line}: {name} ({mine}) "
                           f"imports {target} ({theirs})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_sensitivity_and_solvers_never_import_each_other() -> None:
    # implied by ALLOWED; spelled out because the design contract says it in so many words
    for name, imports in IMPORTS.items():
        for imp in imports:
            if name.split(".")[0] == "sensitivity":
                assert not imp.target.startswith("solvers"), (name, imp)
            if name.split(".")[0] == "solvers":
                assert not imp.target.startswith("sensitivity"), (name, imp)
            if name.startswith("allocator.backend"):
                assert not imp.target.startswith(("solvers", "sensitivity")), (name, imp)


def test_no_heavy_imports_at_module_level() -> None:
    bad = [f"{name}:{imp.line} imports {imp.target}"
           for name, imports in IMPORTS.items() if layer_of(name) in NO_HEAVY_AT_IMPORT
           for imp in imports
           if imp.top_level and imp.target.split(".")[0] in HEAVY]
    assert not bad, bad


def _owner(target: str) -> str | None:
    """The package a private name in ``target`` belongs to (None when nothing is private)."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            owner = ".".join(parts[:i])
            if owner in MODULES and MODULES[owner].name != "__init__.py":
                owner = owner.rsplit(".", 1)[0]  # a private name of a module: its package's
            return owner
    return None


def test_private_modules_stay_inside_their_package() -> None:
    bad = []
    for name, imports in IMPORTS.items():
        for imp in imports:
            owner = _owner(imp.target)
            if owner is None or name == owner or name.startswith(owner + "."):
                continue
            if (name, _known_module(imp.target) or imp.target) in KNOWN_EXCEPTIONS:
                continue
            bad.append(f"{MODULES[name].relative_to(ROOT)}:{imp.line}: {name} imports "
                       f"{imp.target} (private to {owner}); export it from {owner}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    # the checker itself: a solver importing an estimator module and torch, a private name, and
    # an annotation-only import (checked, but not executed at import time)
    path = tmp_path / "bad.py"
    path.write_text("from typing import TYPE_CHECKING\nimport torch\n"
                    "from sensitivity._base import BaseEstimator\n"
                    "def f():\n    from allocator.backend._apply import apply_plan\n"
                    "if TYPE_CHECKING:\n    from allocator.jobs import pipeline\n"
                    "else:\n    import json\n")
    found = _imports("solvers._bad", path)
    assert [(i.target, i.top_level, i.type_checking) for i in found[2:]] == [
        ("torch", True, False), ("sensitivity._base", True, False),
        ("sensitivity._base.BaseEstimator", True, False),
        ("allocator.backend._apply", False, False), ("allocator.backend._apply.apply_plan", False, False),
        ("allocator.jobs", False, True), ("allocator.jobs.pipeline", False, True),
        ("json", True, False)]
    assert layer_of("sensitivity._base") not in ALLOWED["solvers"]
    assert _owner("sensitivity._base.BaseEstimator") == "sensitivity"
    assert _owner("allocator.backend._apply") == "allocator.backend"
    assert _owner("allocator.core.table._META_KEY") == "allocator.core"
    assert _owner("allocator.backend.apply_plan") is None


def test_benchmarks_use_public_names_only() -> None:
    # a benchmark measures what a user can call; a private import would also break silently
    # when the package reorganizes its internals
    bad = [f"{path.relative_to(ROOT)}:{imp.line}: imports {imp.target} (private to {owner}); "
           f"use what {owner} exports"
           for name, path in BENCHMARKS.items() for imp in _imports(name, path)
           if (owner := _owner(imp.target)) is not None
           and imp.target.split(".")[0] in PACKAGES]
    assert BENCHMARKS and not bad, "\n".join(sorted(set(bad)))


def test_loggers_are_named_after_their_module() -> None:
    bad = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "getLogger" and node.args):
                continue
            arg = node.args[0]
            if (isinstance(arg, ast.Name) and arg.id == "__name__") or (
                    isinstance(arg, ast.Constant) and arg.value == name):
                continue
            service = name.startswith(("allocator.service", "allocator.cli._serve"))
            if (service and isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                    and arg.value.startswith("bitalloc.service")):
                continue
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: getLogger({ast.unparse(arg)})")
    assert not bad, "use logging.getLogger(__name__): " + "; ".join(bad)


@pytest.mark.parametrize("module", ["allocator", "solvers", "sensitivity", "allocator.core.io",
                                    "allocator.backend", "allocator.export"])
def test_importing_loads_no_torch(module: str) -> None:
    code = (f"import sys, {module}; bad = [m for m in {HEAVY!r} if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"import {module} loads {r.stdout.strip()} {r.stderr[-300:]}"
