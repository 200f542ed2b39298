"""anomalib's benchmark pipeline over the plugin's models: why the per-model layer exists, its errors, the configs.

The layer's merged table is checked on the run that ``tests/test_reproduce_papers.py`` makes anyway (four models
with different arguments), so the suite trains those tiny models once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from anomalib.models import get_model
from anomalib.pipelines.benchmark.job import BenchmarkJob
from anomalib.pipelines.components.utils import get_iterator_from_grid_dict

from anomalib_mlff.pipelines.benchmark import run_benchmark, split_by_model
from anomalib_mlff.registry import MODELS
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs" / "benchmark"


def padim_config(root: Path) -> dict:
    """anomalib's own benchmark config format: one model on one category under ``root``."""
    return {
        "accelerator": "cpu",
        "benchmark": {
            "seed": 0,
            "model": {"class_path": "Padim", "init_args": {"backbone": "resnet18", "pre_trained": False}},
            "data": {"class_path": "MVTecAD", "init_args": {"root": str(root), "category": "grass", "num_workers": 0}},
        },
    }


def test_anomalib_alone_cannot_tabulate_models_with_different_arguments() -> None:
    """The limitation this layer exists for: ``collect`` keys the table on the first job's flattened config."""
    padim = {"model.class_path": "Padim", "image_AUROC": 0.5}
    mlff = {"model.class_path": "MLFF", "model.init_args.epochs": 1, "image_AUROC": 0.5}
    with pytest.raises(KeyError):
        BenchmarkJob.collect([padim, mlff])


def test_missing_job_is_an_error_not_a_silent_table(tmp_path: Path) -> None:
    """A job that fails inside anomalib's pipeline (which only logs it) stops the layer with the log's path."""
    config = padim_config(tmp_path / "no_such_data")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(RuntimeError, match=r"Padim finished 0 of 1 jobs.*pipeline\.log"):
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
