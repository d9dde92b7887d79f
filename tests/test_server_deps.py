"""pyproject's runtime dependencies are exactly what the package imports (issue 9, item 8)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Declared but not imported by name, each for a reason.
NOT_IMPORTED = {
    "uvloop": "serve names it as uvicorn's loop (loop='uvloop')",
    "starlette": "the dashboard is built on it",
}


def _dist_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9_.\-]+", requirement)
    assert name, requirement
    return name.group(0).lower().replace("_", "-")


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {_dist_name(r) for r in project["dependencies"]}


def imported() -> set[str]:
    """Distributions whose top-level modules quota_proxy imports (standard library excluded)."""
    modules: set[str] = set()
    for path in (REPO / "quota_proxy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"quota_proxy", "__future__"}
    dists = packages_distributions()
    missing = sorted(m for m in modules if m not in dists)
    assert not missing, f"imported but not installed: {missing}"
    return {d.lower().replace("_", "-") for m in modules for d in dists[m]}


def test_runtime_dependencies_match_the_imports() -> None:
    deps, used = declared(), imported()
    assert used - deps == set(), "imported by quota_proxy but not in [project] dependencies"
    assert deps - used - set(NOT_IMPORTED) == set(), "declared but never imported by quota_proxy"
