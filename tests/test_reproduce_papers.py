"""benchmarks/reproduce_papers.py: the embedded dry run end to end, and a clear stop where it cannot download."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests import lightning_helpers as helpers
from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "reproduce_papers.py"
TINY = {"backbone": "resnet18", "pre_trained": False, "visualizer": False}
TINY_MODELS = [
    {"class_path": "MLFF", "init_args": {**TINY, "feature_dim": 16, "tem_levels": 8, "ptfem_levels": 4, "repeat": 1,
                                         "epochs": 1}},
    {"class_path": "MFFA", "init_args": {**TINY, "cait_backbone": "cait_xxs24_224", "n_gaussian_features": 32,
                                         "psg_epochs": 1, "grid_layer": "layer2"}},
    {"class_path": "Patchcore", "init_args": TINY},
    {"class_path": "Padim", "init_args": TINY},
]


def run_script(*args: str, cwd: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, **extra_env}
    return subprocess.run(  # noqa: S603
        [sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1400,
        check=False,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole command, once, on a small copy of the embedded data with tiny models; its output folder."""
    root = tmp_path_factory.mktemp("reproduce")
    helpers.small_copy(root / "data", n_train=4, n_test=2)
    config = yaml.safe_load((REPO_ROOT / "configs" / "benchmark" / "embedded_cpu.yaml").read_text())
    config["benchmark"]["model"]["grid"] = TINY_MODELS
    config["benchmark"]["data"]["init_args"].update(train_batch_size=4, eval_batch_size=8)
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    result = run_script(
        "--embedded", "--root", str(root / "data"), "--categories", "brick", "--f2pad-categories", "brick",
        "--f2pad-images", "1", "--config", str(root / "tiny.yaml"), "--output", str(root / "out"),
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return root / "out"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_embedded_dry_run_writes_the_papers_table_and_chart(dry_run: Path) -> None:
    """Every model measured beside the papers' means; the chart is written."""
    lines = (dry_run / "papers.md").read_text().splitlines()
    means = {tuple(cell.strip() for cell in line.split("|")[2:5]): line.split("|")[6].strip()
             for line in lines if "| mean |" in line}
    for key in [("MLFF", "image_AUROC", "mean"), ("MFFA", "pixel_AUROC", "mean"), ("Padim", "image_AUROC", "mean"),
                ("Patchcore", "IoU", "mean"), ("F2PAD Padim", "Dice", "mean")]:
        assert key in means, key
        assert 0.0 <= float(means[key]) <= 100.0, (key, means[key])
    assert "98.7" in next(line for line in lines if "| MLFF | image_AUROC | mean |" in line)  # the paper's number
    assert (dry_run / "papers.png").stat().st_size > 1000


@pytest.mark.slow
def test_benchmark_layer_merges_models_with_different_arguments(dry_run: Path) -> None:
    """anomalib's pipeline, once per model, gives one table: the union of the models' columns."""
    table = pd.read_csv(dry_run / "benchmark" / "results.csv")
    assert sorted(table["model.class_path"]) == sorted(entry["class_path"] for entry in TINY_MODELS)
    assert (table["data.init_args.category"] == "brick").all()
    for column in ("image_AUROC", "pixel_AUROC"):
        assert table[column].between(0, 1).all(), table[column]
    assert table.loc[table["model.class_path"] == "MLFF", "model.init_args.epochs"].eq(1).all()
    assert table.loc[table["model.class_path"] != "MLFF", "model.init_args.epochs"].isna().all()
    markdown = (dry_run / "benchmark" / "results.md").read_text().splitlines()
    assert len(markdown) == 2 + len(table) and markdown[0].startswith("| model | category | image_AUROC")


def test_download_offline_stops_with_a_clear_message(tmp_path: Path) -> None:
    """Offline for sure, even on an online CI machine: every URL goes to a closed local port."""
    closed = "http://127.0.0.1:9"
    result = run_script("--root", str(tmp_path / "mvtec"), "--categories", "bottle", cwd=tmp_path,
                        http_proxy=closed, https_proxy=closed, HTTP_PROXY=closed, HTTPS_PROXY=closed, no_proxy="")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "could not download MVTec AD (bottle)" in result.stderr
    assert "--embedded" in result.stderr
