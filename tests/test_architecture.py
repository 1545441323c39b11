"""The layout's rules, checked on the source with `ast` (no imports): no import cycles, no function-level
import hiding one, and the layering of docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("losparse", "benchmarks", "reproduce")
#: function-level imports allowed: optional dependencies only (the Triton kernels import triton; the
#: figures import matplotlib, the `plots` extra)
OPTIONAL_MODULES = ("losparse.deploy.kernels", "benchmarks.plots")


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import of a module of `known`."""
    found = []

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            names = []
            if isinstance(child, ast.ImportFrom):
                target = _absolute(module, path.name == "__init__.py", child)
                names = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target
                         for alias in child.names]
            elif isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            for name in names:
                resolved = resolve(name)
                if resolved and resolved != module:
                    found.append((resolved, inside, child.lineno))
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return found


FILES = module_files()
GRAPH = {module: imports_of(module, path, set(FILES)) for module, path in FILES.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_even_through_function_level_imports():
    edges = {module: {target for target, _, _ in found} for module, found in GRAPH.items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_function_level_imports_are_only_optional_dependencies():
    hidden = [f"{FILES[module].relative_to(ROOT)}:{line} imports {target}"
              for module, found in GRAPH.items() for target, inside, line in found
              if inside and not target.startswith(OPTIONAL_MODULES)]
    assert not hidden, "\n".join(hidden)


#: method folder -> the method folders it is built on (a hybrid reuses its parents' code; nothing else crosses)
METHOD_BUILDS_ON = {
    "structured_losparse": ("structured",),
    "cofi": ("structured",),
    "cofi_losparse": ("cofi", "structured"),
    "structured": ("oneshot",),  # the decoder peer's calibration capture
    "losparse": ("oneshot",),  # its one-shot form
}


def _violations(source_prefix: str, allowed) -> list[str]:
    return [f"{module} imports {target}" for module, found in GRAPH.items() if module.startswith(source_prefix)
            for target, _, _ in found if not allowed(module, target)]


@pytest.mark.parametrize("rule, source, allowed", [
    ("the library never imports the repository tooling", "losparse",
     lambda m, t: t.startswith("losparse")),
    ("core imports nothing above it", "losparse.core",
     lambda m, t: t.startswith("losparse.core") or t == "losparse._version"),
    ("training builds on core only", "losparse.training",
     lambda m, t: t.startswith(("losparse.core", "losparse.training", "losparse.deploy"))),
    ("deploy builds on core only", "losparse.deploy",
     lambda m, t: t.startswith(("losparse.core", "losparse.deploy")) or t == "losparse._version"),
    ("methods never import the run scripts' code", "losparse.methods",
     lambda m, t: not t.startswith("losparse.cli")),
    ("methods import no other method's folder but those they are built on (METHOD_BUILDS_ON; shared code: "
     "methods.base, methods.decomposing)", "losparse.methods.",
     lambda m, t: not t.startswith("losparse.methods.") or t in ("losparse.methods.base", "losparse.methods.decomposing")
     or t.split(".")[2] == m.split(".")[2] or t.split(".")[2] in METHOD_BUILDS_ON.get(m.split(".")[2], ())),
    ("tasks never import each other", "losparse.cli.tasks.",
     lambda m, t: not t.startswith("losparse.cli.tasks.") or t == "losparse.cli.tasks.common"),
])
def test_layering(rule, source, allowed):
    assert not _violations(source, allowed), rule + ":\n" + "\n".join(_violations(source, allowed))


def test_the_graph_sees_the_package():
    assert len(FILES) > 40
    assert ("losparse.core.config", False) in {(t, inside) for t, inside, _ in GRAPH["losparse.core.decompose"]}
