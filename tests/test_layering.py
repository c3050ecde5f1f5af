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


def _module_graph() -> dict[str, set[str]]:
    """{module: our modules it imports}, imports inside functions included (a lazy
    import only hides a cycle). ``from package import submodule`` is an edge to the
    submodule alone."""
    modules = {}
    for package in OURS:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path

    def owner(name: str) -> str | None:  # the longest prefix that is one of ours
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in modules:
                return ".".join(parts[:i])
        return None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [owner(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.append(full if full in modules else owner(node.module))
            graph[module] |= {t for t in targets if t and t != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of the graph (as a path back to its start), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_module_imports_one_that_imports_it_back():
    """No import circles, not even through imports inside functions."""
    cycle = _cycle(_module_graph())
    assert not cycle, " -> ".join(cycle)
    # The checker finds one when there is one.
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
