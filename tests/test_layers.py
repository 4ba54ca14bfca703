"""The package's layers import one way, read from the source (ast), nothing imported.

`models`, `datasets`, `eval`, `generate` and `training` are libraries: they know nothing of Ray Train nor of
`vid2vid.platform`, which composes them. And no vid2vid module reaches itself through its imports. Every import
counts, whether at the top of a module, inside a function or under `if TYPE_CHECKING:`: a function-level import is
still a dependency, only a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

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


def imported_names(path: Path, module: str) -> set[str]:
    """Every module `path` names in an import statement, anywhere in the file, relative imports resolved."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            # `from vid2vid.models import warp` imports the module vid2vid.models.warp
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """vid2vid module -> the vid2vid modules it imports (a name resolved to the longest module it names)."""
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for name in imported_names(path, module):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and name != "vid2vid":
                edges.add(name)
        graph[module] = edges
    return graph


def is_library(module: str) -> bool:
    return any(module == f"vid2vid.{layer}" or module.startswith(f"vid2vid.{layer}.") for layer in LIBRARY_LAYERS)


def forbidden_imports() -> list[str]:
    """'module imports forbidden' for each library module that names Ray Train or the platform directly."""
    found = []
    for module, path in package_modules().items():
        if not is_library(module):
            continue
        for name in sorted(imported_names(path, module)):
            if any(name == bad or name.startswith(f"{bad}.") for bad in FORBIDDEN_IN_LIBRARIES):
                found.append(f"{module} imports {name}")
    return found


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


def test_libraries_know_nothing_of_the_platform_nor_ray_train():
    found = forbidden_imports()
    assert not found, "library layers must not import the platform nor ray.train:\n  " + "\n  ".join(found)


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    chains = [" -> ".join(cycle) for cycle in cycles]
    assert not chains, "import cycles among vid2vid modules:\n  " + "\n  ".join(chains)


def test_the_graph_sees_function_level_and_type_checking_imports(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from vid2vid.platform import worker\n"
        "def f():\n    import ray.train\n    from . import sibling\n"
    )
    names = imported_names(source, "vid2vid.models.probe")
    assert {"vid2vid.platform.worker", "ray.train", "vid2vid.models.sibling"} <= names
