"""Imports point one way: model <- curation/pipelines <- serve <- flows <- infra <- cli."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"core", "model", "curation", "pipelines", "serve", "flows", "infra", "cli"}
ALLOWED = {
    "core": set(),
    "model": {"core"},
    "curation": {"core", "model"},
    "pipelines": {"core", "model"},
    "serve": {"core", "model", "pipelines"},
    "flows": {"core", "model", "curation", "pipelines", "serve"},
    # Deployment (local stack, Prefect deployments, KubeRay manifests) sits on top.
    "infra": {"core", "model", "curation", "pipelines", "serve", "flows"},
    "cli": OURS - {"cli"},
}
# model/ must run on a bare GPU box and inside any framework: no infrastructure.
MODEL_FORBIDDEN = {"ray", "prefect", "fastapi", "starlette", "s3fs", "polars", "typer"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = (_imports(path) & OURS) - ALLOWED[package] - {package}
        if package == "model":
            bad |= _imports(path) & MODEL_FORBIDDEN
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("import ray\nfrom serve.app import thing\n")
    assert _imports(bad) == {"ray", "serve"}


def test_tests_import_neither_bench_nor_other_test_files():
    """Shared test helpers live in the package or tests/conftest.py."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module if node.level == 0 else "." + node.module]
            for name in names:
                top = name.lstrip(".").split(".")[0]
                if top == "bench" or top.startswith("test_") or name.startswith("tests."):
                    offenders.append(f"{path.name} imports {name}")
    assert not offenders, "\n".join(offenders)
