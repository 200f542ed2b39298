"""benchmarks/gpu_check.py: a clear stop without CUDA, an honest dry run, and a wheel choice made by a kernel run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU, so the test means the same on a GPU machine
    return subprocess.run(  # noqa: S603
        [sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )


def test_without_cuda_it_exits_with_a_clear_message_and_installs_nothing() -> None:
    result = run_script()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no CUDA device is visible" in result.stderr
    assert "Nothing was installed" in result.stderr
    assert "| check |" not in result.stdout


def test_dry_run_names_every_wheel_and_check_without_running_them(gpu_check: ModuleType, tmp_path: Path) -> None:
    for name in ("faiss_gpu_cu12-1.14-cp312-x.whl", "faiss_cuda-1.14-cp312-x.whl", "faiss_cpu-1.15-cp310-x.whl"):
        (tmp_path / name).touch()
    result = run_script("--dry-run", "--wheels", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    listed = result.stdout.split("then run")[0]
    assert "faiss_cuda-1.14" in listed
    assert "faiss_gpu_cu12-1.14" in listed
    assert "faiss_cpu" not in listed  # the CPU wheel is never a GPU candidate
    for check in gpu_check.CHECKS:
        assert check.name in result.stdout
    assert "| check |" not in result.stdout  # nothing ran


def test_wheels_are_tried_in_the_order_of_preference(gpu_check: ModuleType, tmp_path: Path) -> None:
    for name in ("faiss_gpu_cu12-1.14-x.whl", "faiss_cuda-1.14-x.whl", "faiss_gpu_cuvs-1.15-x.whl"):
        (tmp_path / name).touch()
    order = [Path(path).name.split("-")[0] for path in gpu_check.wheel_candidates("13", tmp_path)]
    assert order == ["faiss_gpu_cuvs", "faiss_cuda", "faiss_gpu_cu12"]
    assert gpu_check.wheel_candidates("99", None) == []


def test_a_faiss_without_a_gpu_kernel_is_refused_with_its_reason(gpu_check: ModuleType, tmp_path: Path) -> None:
    works, reason = gpu_check.probe_kernel(None)  # the test environment's faiss-cpu
    assert not works
    assert "GpuIndexFlatL2" in reason or "StandardGpuResources" in reason
    site, verdicts = gpu_check.choose_faiss("13", tmp_path, tmp_path / "sites")  # an empty wheel folder
    assert site is None
    assert any("no faiss GPU wheel" in verdict for _, verdict in verdicts)
