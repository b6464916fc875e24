"""No import cycles between files: the module graph of ``allocator``, ``sensitivity`` and
``solvers`` is acyclic.

Every import counts, at module level *and* inside functions (a deferred import that closes a cycle
only hides it until the function runs); imports under ``if TYPE_CHECKING:`` are never executed
and are left out (``test_type_checking_cycles_are_reported`` lists the ones there are). An import
``from a.b import c`` is an edge to the module ``a.b.c`` when that is a file, else to ``a.b``;
importing a module also runs its parent packages' ``__init__``, but that is not an edge of its
own (a package re-exporting its modules would otherwise be a cycle with each of them).
"""

from __future__ import annotations

import ast
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("allocator", "sensitivity", "solvers")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path = ROOT) -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))
            if "migrations" not in p.parts}  # alembic scripts: run by alembic only


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _targets(name: str, is_package: bool, source: str) -> tuple[set[str], set[str]]:
    """(run-time, TYPE_CHECKING-only) dotted names imported by a module: ``m`` for ``import m``,
    ``m.x`` for ``from m import x`` (resolved by :func:`_resolve` to ``m.x`` if that is a module,
    else to ``m``)."""
    package = name if is_package else name.rpartition(".")[0]
    run: set[str] = set()
    typing_only: set[str] = set()

    def visit(node: ast.AST, into: set[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.body:
                    visit_one(sub, typing_only)
                for sub in child.orelse:
                    visit_one(sub, into)
                continue
            visit_one(child, into)

    def visit_one(child: ast.AST, into: set[str]) -> None:
        if isinstance(child, ast.Import):
            into.update(a.name for a in child.names)
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                base = package.split(".")
                base = base[:len(base) - (child.level - 1)]
                module = ".".join(base + ([child.module] if child.module else []))
            else:
                module = child.module or ""
            into.update(f"{module}.{a.name}" for a in child.names)
        visit(child, into)

    visit(ast.parse(source), run)
    return run, typing_only


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    parts = target.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph(modules: dict[str, Path], *, type_checking: bool = False) -> dict[str, set[str]]:
    """Module → the modules it imports (run time; or only under TYPE_CHECKING)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        run, typing_only = _targets(name, path.name == "__init__.py", path.read_text("utf-8"))
        wanted = typing_only - run if type_checking else run
        graph[name] = {m for t in wanted if (m := _resolve(t, modules)) is not None and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan, iterative),
    each as the path ``a → b → … → a``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [_one_cycle(graph, c) for c in components]


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if child not in parent:
                    parent[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def _show(cycle: list[str]) -> str:
    return " → ".join(cycle)


def test_no_import_cycles_between_files() -> None:
    found = cycles(import_graph(MODULES))
    assert not found, ("import cycles (move the shared piece into its own module, or import the "
                       "defining module instead of the package):\n" + "\n".join(map(_show, found)))


def test_type_checking_cycles_are_reported() -> None:
    # imports only under TYPE_CHECKING never run, so a cycle they close is allowed; list them so
    # a reader sees which annotations point back up the graph
    run = import_graph(MODULES)
    typing_only = import_graph(MODULES, type_checking=True)
    both = {m: run[m] | typing_only[m] for m in MODULES}
    found = cycles(both)
    print("cycles closed only by TYPE_CHECKING imports:", *map(_show, found), sep="\n  ")
    for cycle in found:  # each needs a TYPE_CHECKING edge, or the run-time test above fails
        assert any(b in typing_only[a] and b not in run[a] for a, b in pairwise(cycle))


def test_the_checker_finds_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "solvers"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from solvers._a import f\n")
    (pkg / "_a.py").write_text("def f():\n    from solvers import _b\n")
    (pkg / "_b.py").write_text("from typing import TYPE_CHECKING\nimport os\n"
                               "if TYPE_CHECKING:\n    from solvers._c import C\n"
                               "from solvers._a import f\n")
    (pkg / "_c.py").write_text("from typing import TYPE_CHECKING\n"
                               "if TYPE_CHECKING:\n    from solvers._b import g\n")
    modules = {f"solvers{'' if p.stem == '__init__' else '.' + p.stem}": p
               for p in sorted(pkg.glob("*.py"))}
    graph = import_graph(modules)
    assert graph == {"solvers": {"solvers._a"}, "solvers._a": {"solvers._b"},
                     "solvers._b": {"solvers._a"}, "solvers._c": set()}
    assert cycles(graph) == [["solvers._a", "solvers._b", "solvers._a"]]
    assert import_graph(modules, type_checking=True)["solvers._c"] == {"solvers._b"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
