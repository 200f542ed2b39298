"""anomalib's benchmark pipeline over the plugin's models: the per-model layer, its merged table, the configs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from anomalib.models import get_model
from anomalib.pipelines.benchmark.job import BenchmarkJob
from anomalib.pipelines.components.utils import get_iterator_from_grid_dict

from anomalib_mlff.data import EMBEDDED_CATEGORIES
from anomalib_mlff.pipelines.benchmark import run_benchmark, split_by_model
from anomalib_mlff.registry import MODELS
from tests import lightning_helpers as helpers
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs" / "benchmark"
QUIET = {"backbone": "resnet18", "pre_trained": False, "visualizer": False}
TINY_MLFF = {**QUIET, "feature_dim": 16, "tem_levels": 8, "ptfem_levels": 4, "repeat": 1, "epochs": 1}


def tiny_config(root: Path) -> dict:
    """Padim and a one-epoch MLFF (different init_args) on two tiny categories."""
    return {
        "accelerator": "cpu",
        "benchmark": {
            "seed": 0,
            "model": {"grid": [
                {"class_path": "Padim", "init_args": QUIET},
                {"class_path": "MLFF", "init_args": TINY_MLFF},
            ]},
            "data": {"class_path": "MVTecAD", "init_args": {
                "root": str(root), "category": {"grid": list(EMBEDDED_CATEGORIES)},
                "train_batch_size": 4, "eval_batch_size": 8, "num_workers": 0,
            }},
        },
    }


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    root = tmp_path_factory.mktemp("benchmark")
    for category in EMBEDDED_CATEGORIES:
        helpers.small_copy(root / "data", n_train=4, category=category, n_test=2)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(root / "data")))
    return run_benchmark(config, root / "out"), root / "out"


def test_anomalib_alone_cannot_tabulate_models_with_different_arguments() -> None:
    """The limitation this layer exists for: ``collect`` keys the table on the first job's flattened config."""
    padim = {"model.class_path": "Padim", "image_AUROC": 0.5}
    mlff = {"model.class_path": "MLFF", "model.init_args.epochs": 1, "image_AUROC": 0.5}
    with pytest.raises(KeyError):
        BenchmarkJob.collect([padim, mlff])


def test_merged_table_has_every_model_and_category(merged) -> None:  # noqa: ANN001
    table, out = merged
    assert sorted(zip(table["model.class_path"], table["data.init_args.category"], strict=True)) == sorted(
        (model, category) for model in ("MLFF", "Padim") for category in EMBEDDED_CATEGORIES
    )
    for column in ("image_AUROC", "pixel_AUROC"):
        assert table[column].between(0, 1).all(), table[column]
    # the union of both models' columns: MLFF's own arguments are empty on PaDiM's rows
    assert table.loc[table["model.class_path"] == "MLFF", "model.init_args.epochs"].eq(1).all()
    assert table.loc[table["model.class_path"] == "Padim", "model.init_args.epochs"].isna().all()
    assert pd.read_csv(out / "results.csv").shape == table.shape
    markdown = (out / "results.md").read_text().splitlines()
    assert len(markdown) == 2 + len(table) and markdown[0].startswith("| model | category | image_AUROC")


def test_missing_job_is_an_error_not_a_silent_table(tmp_path: Path) -> None:
    """A job that fails inside anomalib's pipeline (which only logs it) stops the layer with the log's path."""
    config = tiny_config(tmp_path / "no_such_data")
    config["benchmark"]["model"] = config["benchmark"]["model"]["grid"][0]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(RuntimeError, match=r"Padim finished 0 of 2 jobs.*pipeline\.log"):
        run_benchmark(path, tmp_path / "out")


@pytest.mark.parametrize(("name", "categories"), [("embedded_cpu.yaml", 2), ("mvtec_gpu.yaml", 15)])
def test_shipped_configs_cover_every_plugin_model_and_the_peers(name: str, categories: int) -> None:
    config = yaml.safe_load((CONFIGS / name).read_text())
    per_model = split_by_model(config)
    models = [single["benchmark"]["model"]["class_path"] for single in per_model]
    assert sorted(models) == sorted([class_name for _, class_name in MODELS] + ["Patchcore", "Padim"])
    for single in per_model:
        assert len(list(get_iterator_from_grid_dict(single["benchmark"]))) == categories


def test_embedded_config_arguments_build_every_model() -> None:
    """anomalib's own ``get_model`` accepts each entry (no download: all random-init)."""
    config = yaml.safe_load((CONFIGS / "embedded_cpu.yaml").read_text())
    for single in split_by_model(config):
        entry = single["benchmark"]["model"]
        assert type(get_model(entry)).__name__ == entry["class_path"]
