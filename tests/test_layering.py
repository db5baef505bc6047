"""The package boundaries of STYLE §1, checked on the real import graph."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB = {"fastapi", "starlette", "httpx", "uvicorn", "aiohttp", "app", "workers"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_never_import_web_code(path):
    assert _imports(path) & WEB == set()


@pytest.mark.parametrize("path", sorted((ROOT / "workers").glob("*.py")), ids=lambda p: p.name)
def test_workers_never_import_the_gateway(path):
    assert "app" not in _imports(path)


@pytest.mark.parametrize("path", sorted((ROOT / "protocol").glob("*.py")), ids=lambda p: p.name)
def test_protocol_is_the_ground_floor(path):
    """DESIGN §2: the codec imports no torch, no web framework, neither `app` nor `workers`."""
    assert _imports(path) & (WEB | {"torch", "models"}) == set()


@pytest.mark.parametrize("package", ["app", "models", "workers", "protocol", "bench"])
def test_init_files_are_empty(package):
    assert (ROOT / package / "__init__.py").read_text() == ""


@pytest.mark.parametrize("module", ["app.cli", "app.main"])
def test_gateway_modules_do_not_load_torch(module):
    if not (ROOT / Path(*module.split("."))).with_suffix(".py").exists():
        pytest.skip(f"{module} does not exist yet")
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


_DATASET_CONSTANTS = re.compile(
    r"fashion|mnist|ankle|\b28\s*,\s*28\b|\b784\b|IMAGE_SHAPE|NUM_CLASSES|load_split|models\.data", re.I
)


@pytest.mark.parametrize(
    "path", sorted([*(ROOT / "app").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]), ids=lambda p: p.name
)
def test_serving_code_knows_no_dataset(path):
    """DESIGN §2: shapes, classes, labels and the example request come from the bundle's manifest."""
    hits = [
        f"{i}: {line.strip()}"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if _DATASET_CONSTANTS.search(line)
    ]
    assert hits == []


PACKAGES = ["app", "models", "workers", "protocol", "bench"]


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports, anywhere in it: module level, inside functions, and under
    `if TYPE_CHECKING:` (a circle through type hints is still a circle, DESIGN §2)."""
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and not name.endswith("__init__"):
                found.add(name)
    return found


def import_graph(packages: list[str]) -> dict[str, set[str]]:
    paths = {_module_of(p): p for pkg in packages for p in (ROOT / pkg).rglob("*.py")}
    modules = set(paths)
    return {m: _project_imports(p, modules) - {m} for m, p in paths.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            step = next(edges, None)
            if step is not None:
                if step not in graph:
                    continue
                if step not in index:
                    index[step] = low[step] = len(index)
                    stack.append(step)
                    on_stack.add(step)
                    work.append((step, iter(sorted(graph[step]))))
                elif step in on_stack:
                    low[node] = min(low[node], index[step])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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


def test_the_import_graph_has_no_circle_in_any_package():
    """DESIGN §2: no import circle anywhere, TYPE_CHECKING and function-local imports included."""
    assert circles(import_graph(PACKAGES)) == []


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert circles(graph) == [["a", "b", "c"]]


GROUND_FLOOR = ["app.measures", "app.patience", "app.hedging", "app.errors", "app.settings", "app.eventlog"]


@pytest.mark.parametrize("module", GROUND_FLOOR)
def test_the_gateways_ground_floor_imports_nothing_above_it(module):
    """The fan-out's own measurements and the plain building blocks import no other app module
    (DESIGN §2), so admission, status and metrics can read them without reaching back up."""
    allowed = {"app.hedging"} if module == "app.patience" else set()
    assert {m for m in import_graph(["app"])[module] if m.startswith("app.")} <= allowed


def test_one_request_path_top_to_bottom():
    """Surfaces → data plane → lifecycle → fan-out → channels, never back up (DESIGN §2)."""
    graph = import_graph(["app"])
    surfaces = {"app.hotpath", "app.rpc", "app.routes.requests", "app.routes.infer", "app.routes.health"}
    below = ["app.dataplane", "app.lifecycle", "app.fanout", "app.replicas", "app.channel", "app.admission"]
    for module in below:
        reach = _reach(graph, module)
        assert reach & surfaces == set(), module
        assert "app.state" not in reach and "app.main" not in reach, module
    assert "app.dataplane" not in _reach(graph, "app.fanout")
    assert "app.lifecycle" not in _reach(graph, "app.fanout")


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), set()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen
