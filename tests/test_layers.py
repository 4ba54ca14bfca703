"""The package's layers import one way, read from the source (ast), nothing imported.

`models`, `datasets`, `eval`, `generate` and `training` are libraries: they know nothing of Ray Train nor of
`vid2vid.platform`, which composes them. And no vid2vid module reaches itself through its imports. Every import
counts, whether at the top of a module, inside a function or under `if TYPE_CHECKING:`: a function-level import is
still a dependency, only a later one.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "vid2vid"
LIBRARY_LAYERS = ("models", "datasets", "eval", "generate", "training")
FORBIDDEN_IN_LIBRARIES = ("vid2vid.platform", "ray.train")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


@dataclass(frozen=True)
class ImportStatement:
    line: int
    names: tuple[str, ...]  # what it may import: `from a.b import c` is a.b or a.b.c (module or attribute)


def import_statements(path: Path, module: str) -> list[ImportStatement]:
    """Every import statement of ``path``, anywhere in the file (function bodies, TYPE_CHECKING blocks),
    relative imports resolved against ``module``."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [ImportStatement(node.lineno, (alias.name,)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            found += [ImportStatement(node.lineno, (base, f"{base}.{alias.name}")) for alias in node.names]
    return sorted(found, key=lambda s: s.line)


def imported_names(path: Path, module: str) -> set[str]:
    return {name for statement in import_statements(path, module) for name in statement.names}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The vid2vid module a dotted name lies in (``vid2vid.models.warp.warp`` -> ``vid2vid.models.warp``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """vid2vid module -> the vid2vid modules it imports (the package ``vid2vid`` itself left out)."""
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {resolve(name, modules) for name in imported_names(path, module)}
        graph[module] = {t for t in targets if t and t not in (module, "vid2vid")}
    return graph


def in_layer(module: str, layer: str) -> bool:
    return module == layer or module.startswith(f"{layer}.")


def is_library(module: str) -> bool:
    return any(in_layer(module, f"vid2vid.{layer}") for layer in LIBRARY_LAYERS)


def forbidden_target(statement: ImportStatement) -> str | None:
    for name in statement.names:
        if any(in_layer(name, bad) for bad in FORBIDDEN_IN_LIBRARIES):
            return name
    return None


def forbidden_imports() -> list[str]:
    """One line per forbidden import a library module makes, itself or through shared modules.

    A library module's own imports count, and so do those of the shared top-level modules it reaches
    (``vid2vid.config``, ``vid2vid.storage``...): each chain is walked through shared modules only, since
    a library module on the way is checked on its own and the platform is the forbidden layer itself.
    """
    modules = package_modules()
    graph = import_graph()
    found = []
    for library in sorted(m for m in modules if is_library(m)):
        chains = {library: [library]}
        queue = [library]
        while queue:
            module = queue.pop(0)
            for statement in import_statements(modules[module], module):
                target = forbidden_target(statement)
                if target:
                    chain = " -> ".join(chains[module])
                    found.append(f"{chain} -> {target} ({modules[module].relative_to(PACKAGE_ROOT.parent)}:"
                                 f"{statement.line})")
            for target in sorted(graph[module]):
                shared = not is_library(target) and not in_layer(target, "vid2vid.platform")
                if shared and target not in chains:
                    chains[target] = [*chains[module], target]
                    queue.append(target)
    return sorted(set(found))


def layer_of(module: str) -> str:
    """``vid2vid.models.warp`` -> ``vid2vid.models``; a top-level module is its own layer."""
    return ".".join(module.split(".")[:2])


def layer_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    layers: dict[str, set[str]] = {layer_of(m): set() for m in graph}
    for module, targets in graph.items():
        layers[layer_of(module)] |= {layer_of(t) for t in targets} - {layer_of(module)}
    return layers


def example_edge(graph: dict[str, set[str]], source_layer: str, target_layer: str) -> str:
    """One module-level import behind a layer-level edge, for the error message."""
    for module in sorted(graph):
        if layer_of(module) == source_layer:
            for target in sorted(graph[module]):
                if layer_of(target) == target_layer:
                    return f"{module} -> {target}"
    return f"{source_layer} -> {target_layer}"


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import chain per strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = lowlink[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                lowlink[node] = min(lowlink[node], lowlink[target])
            elif target in on_stack:
                lowlink[node] = min(lowlink[node], index[target])
        if lowlink[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [shortest_cycle(graph, component) for component in components]


def shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """The shortest chain from the component's first module back to itself, for the error message."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        next_frontier = []
        for node in frontier:
            for target in sorted(graph[node] & members):
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    next_frontier.append(target)
        frontier = next_frontier
    return component


def dynamic_imports(path: Path) -> list[int]:
    """Lines that call ``importlib.import_module`` or ``__import__``: imports no graph can see."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                lines.append(node.lineno)
    return lines


def test_libraries_know_nothing_of_the_platform_nor_ray_train():
    found = forbidden_imports()
    if found:
        pytest.fail("models, datasets, eval, generate and training must not import vid2vid.platform nor ray.train "
                    "(the platform composes them):\n  " + "\n  ".join(found), pytrace=False)


def test_libraries_import_nothing_by_name_at_run_time():
    """A registry that imports its readers by name (importlib) hides a circle from the graph: libraries
    import at the top, so the two tests above see every edge."""
    found = [f"{path.relative_to(PACKAGE_ROOT.parent)}:{line}" for module, path in package_modules().items()
             if is_library(module) for line in dynamic_imports(path)]
    if found:
        pytest.fail("dynamic imports in library layers:\n  " + "\n  ".join(found), pytrace=False)


def test_no_import_cycles_among_modules():
    chains = [" -> ".join(cycle) for cycle in import_cycles(import_graph())]
    if chains:
        pytest.fail("import cycles among vid2vid modules:\n  " + "\n  ".join(chains), pytrace=False)


def test_layers_import_one_way():
    """The same at the level of layers (subpackages and top-level modules): a module-level graph can be
    free of cycles while models -> datasets -> models still ties two layers into one."""
    graph = import_graph()
    cycles = import_cycles(layer_graph(graph))
    chains = []
    for cycle in cycles:
        edges = (example_edge(graph, a, b) for a, b in zip(cycle, cycle[1:], strict=False))
        chains.append(" -> ".join(cycle) + "  (" + ", ".join(edges) + ")")
    if chains:
        pytest.fail("import cycles among vid2vid layers:\n  " + "\n  ".join(chains), pytrace=False)


def test_the_graph_sees_function_level_and_type_checking_imports(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from vid2vid.platform import worker\n"
        "def f():\n    import ray.train\n    from . import sibling\n"
    )
    statements = import_statements(source, "vid2vid.models.probe")
    assert [s.line for s in statements] == [1, 3, 5, 6]
    assert [forbidden_target(s) for s in statements] == [None, "vid2vid.platform", "ray.train", None]
    assert "vid2vid.models.sibling" in imported_names(source, "vid2vid.models.probe")


def test_a_cycle_is_reported_as_its_chain():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]
