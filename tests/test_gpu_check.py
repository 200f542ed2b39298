"""benchmarks/gpu_check.py stops with a clear message, before installing anything, where there is no CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_gpu_check_without_cuda_exits_with_a_clear_message() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU, so the test means the same on a GPU machine
    result = subprocess.run(  # noqa: S603
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no CUDA device is visible" in result.stderr
    assert "Nothing was installed" in result.stderr
    assert "| check |" not in result.stdout
