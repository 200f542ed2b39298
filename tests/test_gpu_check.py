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


def test_a_check_this_machine_cannot_run_says_why_whatever_the_budget(  # noqa: ANN201
    gpu_check, tmp_path, capsys, monkeypatch  # noqa: ANN001
):
    """With no budget left every check is skipped for time, except one that could not run here anyway (DDP on fewer
    than two GPUs), which says that instead."""
    monkeypatch.setattr(gpu_check, "ddp_cannot_run", lambda: "1 GPU visible; DDP needs two")
    checks = [gpu_check.Check(check.name, check.what, check.seconds, check.run,
                              gpu_check.ddp_cannot_run if check.name == "DDP" else check.cannot_run)
              for check in gpu_check.CHECKS]
    monkeypatch.setattr(gpu_check, "CHECKS", tuple(checks))
    gpu_check.run_checks(tmp_path, smoke=True, budget_s=0)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(gpu_check.ROW_PREFIX)]
    assert len(rows) == len(checks)
    assert rows[-1] == gpu_check.ROW_PREFIX + '["DDP", "not run", "1 GPU visible; DDP needs two"]'
    assert all('"skipped"' in row for row in rows[:-1])
