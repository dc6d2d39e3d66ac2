"""Modules import only downward (DEVELOPERS.md, 'Layout'): checked on the source, not at run time.

The import graph is checked against the layer table in DEVELOPERS.md: no upward import, no cycle.
Imports inside functions count: they are how heavy modules load late, not a way around the layers.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import imgflow

SRC = Path(imgflow.__file__).parent
DEVELOPERS = SRC.parents[1] / "DEVELOPERS.md"
# Reports are built from saved files: they may read runs, data and metrics, never drive training,
# tuning, workflows or the command line.
REPORTS_MAY_NOT_IMPORT = ("imgflow.workflow", "imgflow.tune", "imgflow.reproduce", "imgflow.cli",
                          "imgflow.api", "imgflow.training")
REPORTS_MAY_IMPORT = ("imgflow.training.config", "imgflow.training.schedule")  # plain data and functions
REPORTS = sorted((SRC / "reports").glob("*.py"))


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import in the tree, those inside functions too."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: p.name)
def test_reports_do_not_import_training_tuning_or_the_cli(path):
    bad = [f"line {line}: {name}" for line, name in _imported(ast.parse(path.read_text()))
           if name.startswith(REPORTS_MAY_NOT_IMPORT) and not name.startswith(REPORTS_MAY_IMPORT)]
    assert not bad, f"{path.name} imports {bad}"


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(SRC)))
def test_an_import_of_our_own_code_is_never_silenced(path):
    """A broken imgflow module must fail loudly, not turn into 'feature unavailable'."""
    silenced = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            silenced += [f"line {line}: {name}" for line, name in _imported(ast.Module(node.body, []))
                         if name.startswith("imgflow")]
    assert not silenced, f"{path.relative_to(SRC)} catches ImportError around {silenced}"


def layer_table() -> dict[str, int]:
    """{module prefix: layer} from the '## Layout' table."""
    text = DEVELOPERS.read_text()
    section = text[text.index("## Layout"):]
    section = section[:section.index("\n## ", 1)]
    layers = {}
    for row in re.finditer(r"^\| (\d+) \| (.+?) \|", section, re.M):
        for name in re.findall(r"`(imgflow[\w.]*)`", row.group(2)):
            layers[name] = int(row.group(1))
    return layers


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the imgflow modules it imports}; `from package import name` counts as importing
    package.name when that is a module, else the package."""
    known = modules()
    graph = {}
    for module, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                         for a in node.names]
            else:
                continue
            targets |= {_owning_module(name, known) for name in names if name.startswith("imgflow")}
        graph[module] = targets - {module, None}
    return graph


def _owning_module(name: str, known) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def layer_of(module: str, layers: dict[str, int]) -> int:
    matches = [p for p in layers if module == p or module.startswith(p + ".")]
    assert matches, f"{module} is in no layer of DEVELOPERS.md's layout table: add it"
    return layers[max(matches, key=len)]


def test_every_module_has_a_layer():
    layers = layer_table()
    assert len(layers) > 20
    for module in modules():
        layer_of(module, layers)


def test_no_module_imports_from_a_layer_above_its_own():
    layers, upward = layer_table(), []
    for module, targets in import_graph().items():
        upward += [f"{module} ({layer_of(module, layers)}) imports {t} ({layer_of(t, layers)})"
                   for t in sorted(targets) if layer_of(t, layers) > layer_of(module, layers)]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_imports_form_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_checks_catch_what_they_are_for():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    layers = layer_table()
    assert layer_of("imgflow.training.config", layers) < layer_of("imgflow.training.loop", layers)
    assert layer_of("imgflow.runs", layers) < layer_of("imgflow.training.loop", layers)


MAX_FUNCTION_LINES = 60  # a screen: a longer function holds more than one step to name


def test_no_function_is_longer_than_a_screen():
    long = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, "\n".join(long)
