"""Shared test fixtures: small, CPU-only, random-initialised models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def fresh_interpreter_env() -> dict[str, str]:
    """The environment of a fresh interpreter that sees the installed package, not the source tree's path."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture
def run_python(tmp_path: Path):  # noqa: ANN201
    """Run Python code in a fresh interpreter of this environment, outside the source tree."""
    import subprocess

    def _run(code: str, *, python: str = sys.executable, timeout: int = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 - our own interpreter and code
            [python, "-c", code],
            cwd=tmp_path,
            env=fresh_interpreter_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return _run
