"""benchmarks/reproduce_papers.py: the embedded dry run end to end, and a clear stop where it cannot download."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
import yaml

from anomalib_mlff.post_processing.f2pad import F2PAD
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


def script_module() -> ModuleType:
    """The script as a module, for its settings functions (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("reproduce_papers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    for key in [("MLFF", "pixel_PRO", "mean"), ("Padim", "pixel_PRO", "mean")]:  # PRO: anomalib's AUPRO
        assert 0.0 <= float(means[key]) <= 100.0, (key, means[key])
    defaults = {tuple(cell.strip() for cell in line.split("|")[2:5]): line.split("|")[7].strip()
                for line in lines if "| mean |" in line}
    for model in ("F2PAD Patchcore", "F2PAD Padim"):  # the second, labelled F2PAD column
        assert 0.0 <= float(defaults[(model, "IoU", "mean")]) <= 100.0
    assert defaults[("Padim", "IoU", "mean")] == "-"  # only F2PAD has a defaults column
    assert (dry_run / "papers.png").stat().st_size > 1000


@pytest.mark.slow
def test_embedded_dry_run_records_every_runs_settings(dry_run: Path) -> None:
    """settings.yaml (and papers.md) give each run's exact settings: the models as run, both F2PAD columns."""
    settings = yaml.safe_load((dry_run / "settings.yaml").read_text())
    assert settings["benchmark"] == TINY_MODELS
    assert settings["f2pad_test_set"].startswith("1 training images per category held out of training")
    assert "the paper held out 54" in settings["f2pad_test_set"]
    runs = {(run["model"], run["column"]): run for run in settings["f2pad"]}
    assert sorted(runs) == [("PaDiM", "defaults"), ("PaDiM", "paper"), ("PatchCore", "defaults"),
                            ("PatchCore", "paper")]
    caps = {"max_iterations": 20, "reestimation_iterations": 5}
    for model in ("PatchCore", "PaDiM"):
        paper, defaults = runs[(model, "paper")], runs[(model, "defaults")]
        assert paper["f2pad_arguments"] == {"preset": "paper", **caps}
        assert defaults["f2pad_arguments"] == caps
        assert paper["f2pad_settings"] == F2PAD(preset="paper", **caps).settings.to_config()
        assert defaults["f2pad_settings"] == F2PAD(**caps).settings.to_config()
        assert paper["f2pad_settings"] != defaults["f2pad_settings"]
        assert paper["model_arguments"]["backbone"] == "resnet18"
        assert paper["model_arguments"]["pre_trained"] is False
    text = (dry_run / "papers.md").read_text()
    assert "## Settings of every run" in text and "F2PAD PaDiM (paper)" in text and "'preset': 'paper'" in text


def test_online_settings_are_the_papers() -> None:
    """Without running: PaDiM as the PaDiM paper MLFF quotes, torchvision weights, F2PAD paper mode vs defaults."""
    script = script_module()
    config = script.benchmark_config(REPO_ROOT / "configs" / "benchmark" / "mvtec_gpu.yaml", Path("/data"),
                                     ["bottle"], embedded=False)
    grid = {entry["class_path"]: entry["init_args"] for entry in config["benchmark"]["model"]["grid"]}
    assert sorted(grid) == sorted(script.MODELS)
    assert grid["Padim"]["backbone"] == "wide_resnet50_2.tv_in1k" and grid["Padim"]["n_features"] == 550
    assert grid["Patchcore"]["backbone"] == "wide_resnet50_2.tv_in1k"
    assert grid["MLFF"]["backbone"] == "resnet50.tv_in1k" and grid["MFFA"]["backbone"] == "wide_resnet50_2.tv_in1k"
    embedded = script.benchmark_config(REPO_ROOT / "configs" / "benchmark" / "embedded_cpu.yaml", Path("/data"),
                                       ["brick"], embedded=True)
    assert all(entry["init_args"]["backbone"] == "resnet18" for entry in embedded["benchmark"]["model"]["grid"])
    runs = {(run["model"], run["column"]): run for run in script.f2pad_runs(embedded=False)}
    for model in ("PatchCore", "PaDiM"):
        arguments = runs[(model, "paper")]["model_arguments"]
        assert arguments["backbone"] == "resnet18.tv_in1k" and arguments["pre_trained"] is True
        assert runs[(model, "paper")]["f2pad_settings"] == F2PAD(preset="paper").settings.to_config()
        assert runs[(model, "defaults")]["f2pad_settings"] == F2PAD().settings.to_config()
    assert runs[("PaDiM", "paper")]["model_arguments"]["n_features"] == 100


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
