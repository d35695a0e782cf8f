"""The package's shape: no import circles between edgelm modules, no private names borrowed
across packages.

Both are read from the source with :mod:`ast`, so the check runs in milliseconds and sees
every import: module level, under ``if TYPE_CHECKING:`` (a type-only circle is still two
modules that need each other) and inside functions. A function-level import may close a
circle only when its line says why, with ``# import-cycle-ok: <reason>``. Importing
``edgelm.a.b`` also runs ``edgelm/a/__init__.py``, so a module outside package ``edgelm.a``
depends on that package's ``__init__`` too.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "edgelm"
CYCLE_OK = "# import-cycle-ok:"

KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a module of the tree
    name: str | None  # the name taken with ``from target import name`` (None: a module)
    line: int
    marked: bool  # a function-level import whose line carries CYCLE_OK


@cache
def modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package ``__init__``), for the tree under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        if package:
            parts.pop()
        out[".".join(parts)] = (path, package)
    return out


def _function_lines(tree: ast.AST) -> set[int]:
    """Line numbers of import statements inside a function body."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    lines.add(inner.lineno)
    return lines


@cache
def imports(root: Path) -> tuple[Import, ...]:
    """Every import of a module of the tree, by every module of the tree."""
    known = modules(root)
    top = root.name
    found = []
    for name, (path, package) in known.items():
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, str(path))
        text_lines = source.splitlines()
        in_function = _function_lines(tree)
        base = name.split(".") if package else name.split(".")[:-1]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                pairs = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base[: len(base) - node.level + 1]
                    module = ".".join([*anchor, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                pairs = []
                for alias in node.names:
                    submodule = f"{module}.{alias.name}"
                    pairs.append((submodule, None) if submodule in known else (module, alias.name))
            else:
                continue
            marked = node.lineno in in_function and CYCLE_OK in text_lines[node.lineno - 1]
            for target, imported in pairs:
                if target != top and not target.startswith(top + "."):
                    continue
                found.append(Import(name, target, imported, node.lineno, marked))
    return tuple(found)


def dependencies(root: Path) -> dict[str, set[str]]:
    """Module → the modules of the tree that importing it runs (marked imports left out)."""
    known = modules(root)
    graph: dict[str, set[str]] = {name: set() for name in known}
    for imp in imports(root):
        if imp.marked:
            continue
        targets = {imp.target}
        parts = imp.target.split(".")
        for n in range(2, len(parts)):  # parent packages' __init__, unless we are inside them
            parent = ".".join(parts[:n])
            if not (imp.importer == parent or imp.importer.startswith(parent + ".")):
                targets.add(parent)
        graph[imp.importer].update(t for t in targets if t in known and t != imp.importer)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _package(module: str, known: dict[str, tuple[Path, bool]]) -> str:
    return module if known[module][1] else module.rpartition(".")[0]


def private_imports(root: Path) -> set[tuple[str, str, str]]:
    """``(importer, module, name)`` for each ``_name`` taken from another package's module."""
    out = set()
    known = modules(root)
    for imp in imports(root):
        name = imp.name
        if name is None or not name.startswith("_") or name.startswith("__"):
            continue
        if imp.target in known and _package(imp.importer, known) != _package(imp.target, known):
            out.add((imp.importer, imp.target, name))
    return out


# ---------------------------------------------------------------------- the checker itself


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_finds_circles_at_every_level(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "a.py": "from pkg.b import x\n",
            "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import y\n",
            "c.py": "def f():\n    from pkg import d\n",
            "d.py": "from . import c\n",
            "e.py": "def f():\n    from pkg.f import z  # import-cycle-ok: f needs e at start\n",
            "f.py": "import pkg.e\n",
            "sub/__init__.py": "from pkg.sub.inner import thing\n",
            "sub/inner.py": "from pkg.g import h\n",
            "g.py": "from pkg.sub.other import h\n",
            "sub/other.py": "h = 1\n",
        },
    )
    assert cycles(dependencies(root)) == [
        ["pkg.a", "pkg.b"],
        ["pkg.c", "pkg.d"],
        ["pkg.g", "pkg.sub", "pkg.sub.inner"],
    ]


def test_checker_finds_private_names_from_other_packages(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "a.py": "from pkg.sub.b import _hidden, public\nfrom pkg import __version__\n",
            "sub/__init__.py": "",
            "sub/b.py": "from pkg.sub.c import _sibling\n",
            "sub/c.py": "_sibling = 1\n",
        },
    )
    assert private_imports(root) == {("pkg.a", "pkg.sub.b", "_hidden")}


# ---------------------------------------------------------------------- edgelm


def test_edgelm_has_no_import_cycles() -> None:
    found = cycles(dependencies(SRC))
    assert found == [], "import circles (move shared types to a module both can import): " + str(
        found
    )


def test_edgelm_imports_no_private_names_across_packages() -> None:
    found = private_imports(SRC) - KNOWN_PRIVATE_IMPORTS
    assert found == set(), f"make these public or move them: {sorted(found)}"


@pytest.mark.parametrize("leaf", ["edgelm.errors", "edgelm.reporting", "edgelm.policy_spec"])
def test_leaf_modules_stay_leaves(leaf: str) -> None:
    """The modules every layer uses import nothing but errors, so they can never close a
    circle (the settings schema validates policy specs through policy_spec for that reason)."""
    graph = dependencies(SRC)
    assert graph[leaf] <= {"edgelm.errors"}, graph[leaf]


def test_the_settings_schema_imports_no_feature_package() -> None:
    """Core modules sit below the features: everything ``edgelm.settings`` runs on import
    stays outside rag, router, server, bench, evals and cli."""
    graph = dependencies(SRC)
    seen, todo = set(), ["edgelm.settings"]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    features = ("rag", "hybrid", "server", "bench", "evals", "cli")
    assert not {m for m in seen if m.split(".")[1] in features}, sorted(seen)
