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
