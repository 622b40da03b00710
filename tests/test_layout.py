"""Package layout: no import cycles (imports inside functions count) and no private names imported across modules.

Every module of `lfvila_model` and `lfvila_kernels` is parsed with `ast`; each `import` / `from ... import` (at any
depth) becomes an edge to the longest package module it names (relative imports resolved against the module's
package; `from pkg import sub` names the submodule when there is one). The compiled extension `_C` is no Python
module and is left out.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("lfvila_kernels", "lfvila_model")


def _modules() -> dict[str, tuple[str, bool]]:
    """Dotted module name -> (file path, is a package `__init__`)."""
    found = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for fname in files:
                if not fname.endswith(".py"):
                    continue
                path = os.path.join(folder, fname)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                is_pkg = fname == "__init__.py"
                found[dotted.rsplit(".", 1)[0] if is_pkg else dotted] = (path, is_pkg)
    return found


MODULES = _modules()


def _known_prefix(name: str) -> str | None:
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _source_module(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` reads from."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_pkg else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import statement of `module`, at any depth."""
    path, is_pkg = MODULES[module]
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _source_module(module, is_pkg, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    out.append((f"{source}.{alias.name}", None))
                elif alias.name != "_C":
                    out.append((source, alias.name))
    return out


def _graph(package: str) -> dict[str, set[str]]:
    graph = {}
    for module in MODULES:
        if module.split(".")[0] != package:
            continue
        targets = {_known_prefix(target) for target, _ in _imports(module)}
        graph[module] = {t for t in targets if t is not None and t != module and t.split(".")[0] == package}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package):
    cycles = _cycles(_graph(package))
    assert not cycles, f"{package} has import cycles: {cycles}"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_names_across_modules(package):
    offenders = []
    for module in MODULES:
        if module.split(".")[0] != package:
            continue
        for source, name in _imports(module):
            if name is None or not name.startswith("_") or name.startswith("__"):
                continue
            owner = _known_prefix(source)
            if owner is not None and owner != module:
                offenders.append(f"{module}: from {source} import {name}")
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)
