"""Package layout: no import cycles (imports inside functions count), no private names imported across modules, and
imports that run one way (the rules of docs/ARCHITECTURE.md).

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


# ---------------------------------------------------------------------------------------------------------------
# Which way imports run (docs/ARCHITECTURE.md, "Package map"): rules on the modules each module's import
# statements name (at any depth; a package's `__init__` counts as the module `pkg`, outside modules by their
# top-level name).


def _edges(module: str) -> set[str]:
    out = set()
    for target, _ in _imports(module):
        known = _known_prefix(target)
        out.add(known if known is not None else target.split(".")[0])
    return out - {module}


def _in(*names: str):
    """A predicate: the module is one of `names` or inside one of them."""
    return lambda m: any(m == n or m.startswith(n + ".") for n in names)


M = "lfvila_model"
MODEL_MODULES = tuple(f"{M}.{n}" for n in ("config", "presets", "video_encoder", "text_encoder", "fused_block",
                                           "pooling", "objectives", "weight_maps", "weights", "models"))
PUBLIC_OPS = ("lfvila_kernels", "lfvila_kernels.htwa", "lfvila_kernels.losses", "lfvila_kernels._dispatch")

# short name -> (the rule, the modules it applies to, the imports it forbids them)
IMPORT_RULES = {
    "kernels-alone": (
        "lfvila_kernels imports nothing of lfvila_model",
        _in("lfvila_kernels"), _in(M)),
    "no-tests-or-benchmarks": (
        "the packages import neither tests nor benchmarks",
        _in(*PACKAGES), _in("tests", "benchmarks")),
    "backends-below-dispatch": (
        "backends/ and triton/ never import the public op modules or the dispatch (it imports them)",
        _in("lfvila_kernels.backends", "lfvila_kernels.triton"), lambda t: t in PUBLIC_OPS),
    "data-alone": (
        "data/ imports of lfvila_model only data/, config and jsonable (no model, training, evaluation or CLI)",
        _in(f"{M}.data"), lambda t: _in(M)(t) and not _in(f"{M}.data", f"{M}.config", f"{M}.jsonable")(t)),
    "model-below-factory": (
        "the model modules import no data/, train/, cli, serve, factory or package root; of eval/ only eval.encode",
        _in(*MODEL_MODULES),
        lambda t: t == M or _in(f"{M}.data", f"{M}.train", f"{M}.cli", f"{M}.serve", f"{M}.factory")(t)
        or (_in(f"{M}.eval")(t) and t != f"{M}.eval.encode")),
    "encode-no-factory": (
        "eval/encode.py (imported by models.py) imports of lfvila_model only data/ (no factory, no models)",
        _in(f"{M}.eval.encode"), lambda t: _in(M)(t) and not _in(f"{M}.data")(t)),
    "train-from-cli": (
        "only train/ and the command line import train/",
        lambda m: _in(M)(m) and not _in(f"{M}.train", f"{M}.cli")(m), _in(f"{M}.train")),
    "cli-on-top": (
        "only the command line imports cli and serve",
        lambda m: _in(M)(m) and not _in(f"{M}.cli", f"{M}.__main__")(m), _in(f"{M}.cli", f"{M}.serve")),
}


@pytest.mark.parametrize("rule", list(IMPORT_RULES))
def test_imports_run_one_way(rule):
    text, applies, forbidden = IMPORT_RULES[rule]
    modules = [m for m in MODULES if applies(m)]
    assert modules, f"no module is subject to the rule {text!r}: the rule is out of date"
    offenders = [f"{m} imports {t}" for m in sorted(modules) for t in sorted(_edges(m)) if forbidden(t)]
    assert not offenders, f"{text}:\n" + "\n".join(offenders)


def test_import_rules_see_a_violation():
    # the edges the rules read: a relative import, an import inside a function, an outside package
    assert {"lfvila_model.models", "lfvila_model.weights"} <= _edges("lfvila_model.factory")
    assert "lfvila_model.eval.encode" in _edges("lfvila_model.models")  # imported inside a method
    assert "torch" in _edges("lfvila_kernels.htwa")
    _, applies, forbidden = IMPORT_RULES["encode-no-factory"]
    assert applies("lfvila_model.eval.encode") and forbidden("lfvila_model.factory")
    assert not forbidden("lfvila_model.data.loader") and not forbidden("torch")
