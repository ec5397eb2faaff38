"""The package's imports point one way: no cycle, and no module imports a higher layer.

Walks every module's source with `ast` (lazy imports inside functions included), so a forbidden
import fails here even if it only runs on some path.
"""
from __future__ import annotations

import ast
import pkgutil
from pathlib import Path
from typing import Dict, List, Optional, Set

import prune_callbacks

PACKAGE = "prune_callbacks"
ROOT = Path(prune_callbacks.__file__).parent

# high to low: each top-level package (or module) of prune_callbacks and its layer; a module may
# import its own layer or lower ones (never a cycle). docs/ARCHITECTURE.md draws the same table.
LAYERS: Dict[str, int] = {
    "app": 6,
    "callbacks": 5,
    "pruner": 4,
    "sensitivity": 3, "deploy": 3,
    "graph": 2, "training": 2,
    "layers": 1, "planning": 1, "datasets": 1,
    "utils": 0,
}
TOP = "__init__"  # the package's front door re-exports from every layer


def _modules() -> Dict[str, Path]:
    out = {PACKAGE: ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix=PACKAGE + "."):
        rel = info.name[len(PACKAGE) + 1:].replace(".", "/")
        path = ROOT / rel / "__init__.py" if info.ispkg else ROOT / (rel + ".py")
        out[info.name] = path
    return out


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, known: Set[str]) -> Set[str]:
    """Package modules that `module` imports anywhere in its source."""
    found: Set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_pkg, node)
            targets = [f"{base}.{a.name}" for a in node.names]
            if not all(t in known for t in targets):  # `from . import submodule` is not base
                targets.append(base)
        else:
            continue
        for t in targets:
            while t and t not in known:  # `from .x import name`: the module is x
                t = t.rpartition(".")[0]
            if t and t != module and t.startswith(PACKAGE):
                found.add(t)
    return found


def _layer(module: str) -> Optional[int]:
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the package itself
    return LAYERS.get(parts[1])


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer() -> None:
    unranked = [m for m in _modules() if m != PACKAGE and _layer(m) is None]
    assert not unranked, f"give these modules a layer in LAYERS: {unranked}"


def _upward(graph: Dict[str, Set[str]]) -> List[str]:
    bad = []
    for mod, deps in graph.items():
        if mod == PACKAGE:
            continue
        for dep in deps:
            if dep == PACKAGE:
                bad.append(f"{mod} -> {dep} (the package front door)")
            elif _layer(dep) > _layer(mod):
                bad.append(f"{mod} (layer {_layer(mod)}) -> {dep} (layer {_layer(dep)})")
    return sorted(bad)


def test_no_import_from_a_lower_layer_to_a_higher_one() -> None:
    bad = _upward(_graph())
    assert not bad, "imports pointing up:\n" + "\n".join(bad)


def test_a_planted_upward_import_between_packages_fails(tmp_path: Path) -> None:
    """The rule is not vacuous: a graph module importing the callbacks package is caught."""
    planted = tmp_path / "channels.py"
    planted.write_text("from ..callbacks.history import history_of\n")
    known = set(_modules())
    graph = dict(_graph())
    graph[f"{PACKAGE}.graph.channels"] = _imports(f"{PACKAGE}.graph.channels", planted, known)
    assert _upward(graph) == [f"{PACKAGE}.graph.channels (layer 2) -> {PACKAGE}.callbacks.history (layer 5)"]


def test_no_import_cycle() -> None:
    graph = _graph()
    state: Dict[str, int] = {}  # 1 visiting, 2 done
    cycles: List[List[str]] = []

    def visit(m: str, stack: List[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d == PACKAGE or _is_parent(d, m):
                continue  # a submodule importing its own package's __init__ is the package itself
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _is_parent(pkg: str, mod: str) -> bool:
    return mod.startswith(pkg + ".")


def test_io_and_pruner_do_not_import_each_other() -> None:
    graph = _graph()
    assert f"{PACKAGE}.pruner" not in graph[f"{PACKAGE}.deploy.io"]
    assert f"{PACKAGE}.deploy.io" not in graph[f"{PACKAGE}.pruner"]
    assert not any(d.startswith(f"{PACKAGE}.callbacks") for d in graph[f"{PACKAGE}.deploy.io"])


def test_the_walker_sees_lazy_imports(tmp_path: Path) -> None:
    """The check cannot pass vacuously: a lazy upward import in a function is found."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from .callbacks.history import history_of\n    return history_of\n")
    known = {f"{PACKAGE}.callbacks", f"{PACKAGE}.callbacks.history", f"{PACKAGE}.io"}
    assert _imports(f"{PACKAGE}.io", src, known) == {f"{PACKAGE}.callbacks.history"}
