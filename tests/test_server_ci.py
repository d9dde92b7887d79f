"""CI fails on lint and type errors (issue 9, item 11): the README's test command is what
`.ci/run` runs, and it goes through scripts/check, which stops on a ruff or mypy error
before the tests run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def readme_test_command() -> str:
    lines = (REPO / "README.md").read_text().splitlines()
    [at] = [i for i, line in enumerate(lines) if line.startswith("# 2.")]
    return lines[at + 1].strip()


def test_ci_runs_the_readme_test_command_which_lints_and_type_checks() -> None:
    command = readme_test_command()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines
    assert '".[test,dev]"' in command  # ruff and mypy are in the dev extra
    assert command.endswith("&& scripts/check")
    check = (REPO / "scripts" / "check").read_text()
    assert check.index("-m ruff check quota_proxy tests bench") < check.index("-m mypy") < check.index("-m pytest")


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The package, its tests' first file, pyproject, scripts and bench (linted too) in a
    scratch folder (mypy's cache too, so the type check is incremental)."""
    for name in ("quota_proxy", "scripts", "bench", ".mypy_cache"):
        if (REPO / name).exists():
            shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", ".venv*", "results"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "__init__.py").write_text("")
    return tmp_path


def check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(root / "scripts" / "check"), "--collect-only", "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )


def test_check_fails_on_a_lint_error(copy: Path) -> None:
    money = copy / "quota_proxy" / "money.py"
    money.write_text(money.read_text() + "\n\ndef _unused() -> None:\n    import json\n")
    result = check(copy)
    assert result.returncode != 0
    assert "F401" in result.stdout and "money.py" in result.stdout
    assert "collected" not in result.stdout + result.stderr  # stopped before pytest


def test_check_fails_on_a_type_error(copy: Path) -> None:
    money = copy / "quota_proxy" / "money.py"
    money.write_text(money.read_text() + '\n\nWRONG: int = "not an int"\n')
    result = check(copy)
    assert result.returncode != 0
    assert "money.py" in result.stdout and "Incompatible types in assignment" in result.stdout
    assert "collected" not in result.stdout + result.stderr
