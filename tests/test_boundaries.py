"""Module boundaries of the package, read from its source: no private name is imported across
modules or reached through an imported module (`probes._helper`), and no two modules import each other (directly or around a longer loop, type-only imports
included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "jepa_ray"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, list[tuple[str, str]]]:
    """Per module: (imported module, imported name or '') for every jepa_ray import in it."""
    out: dict[str, list[tuple[str, str]]] = {m: [] for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("jepa_ray")
            ):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    out[name].append((sub, "") if sub in mods else (node.module, alias.name))
            elif isinstance(node, ast.Import):
                out[name] += [(a.name, "") for a in node.names if a.name.startswith("jepa_ray.")]
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_private_name_is_imported_across_modules():
    mods = _modules()
    crossing = [
        f"{module} imports {name} from {source}"
        for module, imports in _imports(mods).items()
        for source, name in imports
        if name.startswith("_") and not name.endswith("__") and source != module
    ]
    assert not crossing, crossing


def test_no_private_name_is_reached_through_an_imported_module():
    mods = _modules()
    crossing = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        bound: dict[str, str] = {}  # local name -> the jepa_ray module it stands for
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("jepa_ray")
            ):
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in mods:
                        bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                bound |= {a.asname: a.name for a in node.names if a.asname and a.name in mods}
        crossing += [
            f"{name} reaches {node.attr} of {bound[node.value.id]}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and bound[node.value.id] != name
            and node.attr.startswith("_")
            and not node.attr.endswith("__")
        ]
    assert not crossing, crossing


def test_no_two_modules_import_each_other():
    mods = _modules()
    graph = {
        m: {src for src, _ in imports if src in mods and src != m} for m, imports in _imports(mods).items()
    }
    assert _cycles(graph) == []
    # the check itself finds a loop
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_two_packages_import_each_other():
    """The packages follow the data (synth -> ingest -> shards -> stream -> train -> eval -> tune),
    with the model beside them: no package reaches back into one that depends on it."""
    mods = _modules()

    def package(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else parts[0]

    graph: dict[str, set[str]] = {}
    for module, imports in _imports(mods).items():
        deps = {package(src) for src, _ in imports if src in mods} - {package(module)}
        graph.setdefault(package(module), set()).update(deps)
    for deps in list(graph.values()):
        for d in deps:
            graph.setdefault(d, set())
    assert _cycles(graph) == []
    assert not graph["model"] & {"synth", "ingest", "shards", "stream", "train", "eval", "tune"}
