"""The house rules: no import cycle inside mmexit/, no source file over 450 lines, every key printed."""

from __future__ import annotations

import ast
import subprocess
import sys

from mmexit_testing import REPO

PACKAGE = REPO / "mmexit"


def _module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """mmexit module -> mmexit modules it imports (every import statement, at any depth)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return stack[stack.index(child):] + [child]
            if child not in state:
                found = visit(child)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_inside_mmexit():
    graph = import_graph()
    assert "mmexit.recipe.tasks" in graph and graph["mmexit.tasks.text_schema"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_source_file_over_450_lines():
    long = {str(p.relative_to(REPO)): n for p in list(PACKAGE.rglob("*.py")) + list((REPO / "tools").glob("*.py"))
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_schema_module_prints_every_key_of_both_tasks():
    out = subprocess.run([sys.executable, "-m", "mmexit.schema"], capture_output=True, text=True, cwd=REPO, check=True)
    for key in ("`model.backbone`", "`data.task`", "`evaluate.tolerance`", "`train.lr_schedule`",
                "`model.decoder.config`", "`evaluate.policy`", "`calibration.labels`", "`data.scenes.num_train`"):
        assert key in out.stdout, key
    assert "## task: text_classification" in out.stdout and "## task: captioning" in out.stdout
