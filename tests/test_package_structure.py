"""The house rules: folders import one way (no cycle, no mmexit import inside a function), no source
file over 450 lines, every key printed."""

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


# mmexit's folders (and top-level modules), lowest first: a module imports only from its own group
# or from groups listed before it. The README's layout section shows the same order.
LAYERS = [
    ("errors", "files", "run_folder"),
    ("recipe", "schema"),
    ("statistics", "sources"),
    ("data",),
    ("models",),
    ("exits",),
    ("inference",),
    ("calibration",),
    ("evaluation",),
    ("training",),
    ("tasks",),
    ("stages",),
    ("serve",),
    ("bench",),
    ("runner",),
]
RANK = {name: rank for rank, group in enumerate(LAYERS) for name in group}
# Modules that import an optional dependency at their top (the serve extra): imported inside the
# function that needs them, so that mmexit runs without the extra.
OPTIONAL_DEPENDENCY_MODULES = {"mmexit.serve.app": "fastapi", "mmexit.serve.metrics": "prometheus_client"}
# ``mmexit.load`` (the package's one public function) imports the predictor when called, so that
# ``import mmexit.<anything>`` does not import the server.
LOCAL_IMPORT_ALLOWED = {("mmexit", "mmexit.serve.load")}


def _unit(module: str) -> str:
    """mmexit.tasks.base -> tasks; mmexit.runner -> runner; mmexit -> mmexit."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_imports() -> list[tuple[str, str, bool, int]]:
    """(module, imported mmexit module, at module level?, line) for every import of an mmexit module."""
    out = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"mmexit.{a.name}" for a in node.names] if node.module == "mmexit" else [node.module]
            else:
                continue
            out += [(name, t, id(node) in top, node.lineno) for t in targets if t.split(".")[0] == "mmexit"]
    return out


def test_folders_import_one_way():
    assert set(RANK) >= {_unit(_module_name(p)) for p in PACKAGE.rglob("*.py")} - {"mmexit"}, "a folder is not in LAYERS"
    upward = [f"{name}:{line} imports {target}" for name, target, _, line in module_imports()
              if name != "mmexit" and RANK[_unit(target)] > RANK[_unit(name)]]
    assert not upward, "\n".join(upward)


def test_no_mmexit_import_inside_a_function():
    local = [f"{name}:{line} imports {target}" for name, target, top, line in module_imports()
             if not top and (name, target) not in LOCAL_IMPORT_ALLOWED and target not in OPTIONAL_DEPENDENCY_MODULES]
    assert not local, f"{len(local)} function-local imports of mmexit modules:\n" + "\n".join(local)


def test_optional_dependency_modules_are_the_only_ones_importing_the_serve_extra():
    """The serve extra's packages are imported at module level only by the modules listed as optional."""
    extra = ("fastapi", "starlette", "uvicorn", "prometheus_client", "aiohttp", "httpx", "ray", "peft")
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            if any(n.split(".")[0] in extra for n in names):
                found.add(_module_name(path))
    assert found == set(OPTIONAL_DEPENDENCY_MODULES), found


def test_the_layer_check_sees_an_upward_import():
    assert RANK["models"] < RANK["inference"] < RANK["calibration"] < RANK["tasks"] < RANK["serve"]
    assert any(name == "mmexit.tasks.base" and _unit(target) == "evaluation" for name, target, *_ in module_imports())


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


def test_importing_mmexit_turns_hub_kernels_off_unless_the_user_chose():
    """transformers would otherwise fetch layer kernels from the hub at load time (offline here) and
    refuses to load a model beside an incompatible `kernels` package."""
    import os

    code = "import mmexit, os; print(os.environ['USE_HUB_KERNELS'])"
    env = {key: value for key, value in os.environ.items() if key != "USE_HUB_KERNELS"}
    unset = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    chosen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**env, "USE_HUB_KERNELS": "YES"}, cwd=REPO)
    assert (unset.stdout.strip(), chosen.stdout.strip()) == ("NO", "YES")
