"""The layers' import rules, read from the source (no import runs): services/ uses the model and the data layer but
never the gate's or the trainer's modules; no project module imports another in a cycle; and no import inside a
function body would close one (a lazy import is for start-up time, never to dodge a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "pipelines", "services")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _project_module(name: str) -> str | None:
    """The project module an import of ``name`` loads (``a.b.c`` of ``from a.b import c`` may be a name in a.b)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in MODULES:
            return ".".join(parts[:end])
    return None


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(project module, inside a function, line) of every absolute import in ``path``; ``if TYPE_CHECKING:`` blocks,
    which never run, left out."""
    out: list[tuple[str, bool, int]] = []

    def walk(nodes: list[ast.stmt], in_function: bool) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(node.body, True)
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for module in {m for m in map(_project_module, names) if m}:
                out.append((module, in_function, node.lineno))
            for field in ("body", "orelse", "finalbody", "handlers"):
                child = getattr(node, field, None)
                if isinstance(child, list):
                    walk(child, in_function)

    walk(ast.parse(path.read_text()).body, False)
    return out


IMPORTS = {module: _imports(path) for module, path in MODULES.items()}
GRAPH = {module: {target for target, inner, _ in found if not inner and target != module}
         for module, found in IMPORTS.items()}


def _path(start: str, goal: str) -> list[str] | None:
    """A chain of module-level imports from ``start`` to ``goal``, if there is one."""
    seen, stack = set(), [(start, [start])]
    while stack:
        node, chain = stack.pop()
        if node == goal:
            return chain
        if node not in seen:
            seen.add(node)
            stack += [(nxt, [*chain, nxt]) for nxt in GRAPH.get(node, ())]
    return None


@pytest.mark.parametrize("forbidden", ["pipelines.evaluate", "pipelines.train"])
def test_services_never_import_the_gate_or_the_trainer(forbidden):
    bad = [f"{module}:{line} imports {target}" for module, found in IMPORTS.items() if module.startswith("services")
           for target, _, line in found if target == forbidden or target.startswith(forbidden + ".")]
    assert not bad, "\n".join(bad)


def test_no_module_level_import_cycle():
    cycles = [" -> ".join([module, *chain]) for module, targets in GRAPH.items() for target in targets
              if (chain := _path(target, module))]
    assert not cycles, "\n".join(cycles)


def test_no_import_inside_a_function_dodges_a_cycle():
    dodges = [f"{module}:{line} imports {target} inside a function; at module level it would close "
              f"{' -> '.join([module, *chain])}"
              for module, found in IMPORTS.items() for target, inner, line in found
              if inner and target != module and (chain := _path(target, module))]
    assert not dodges, "\n".join(dodges)


def test_the_rules_see_the_imports():
    """The checks above read real imports (an empty graph would pass them all)."""
    assert "model.policy" in GRAPH["services.policy_server.models"]
    assert any(inner for _, inner, _ in IMPORTS["pipelines.cli"])
