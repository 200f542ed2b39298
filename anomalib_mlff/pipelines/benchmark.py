"""anomalib's benchmark pipeline, run once per model, with the results merged into one table.

anomalib's ``Benchmark`` pipeline (``anomalib benchmark --config``) crosses a grid of models and
datasets, but its ``BenchmarkJob.collect`` builds the table from the first job's keys: when the
models of one grid take different ``init_args`` (MLFF's ``epochs``, PaDiM's none), the flattened
configurations differ, ``collect`` raises ``KeyError``, no ``results.csv`` is written and the
command still exits 0. This layer keeps anomalib's config format and its pipeline, and only

- splits a config whose ``benchmark.model`` is ``{grid: [model, model, ...]}`` into one config
  per model (every other grid, e.g. the categories, stays anomalib's);
- runs anomalib's ``Benchmark`` on each, in its own folder (anomalib writes ``runs/`` under the
  working directory), and fails loudly when a job is missing from its CSV;
- concatenates the CSVs (union of columns) into ``results.csv`` and a markdown ``results.md``;
- with ``--pro``, adds anomalib's ``AUPRO`` (``pixel_AUPRO``, the papers' PRO) to every model's test
  metrics: a benchmark config cannot set an evaluator, and no model's default evaluator has it.

    python -m anomalib_mlff.pipelines.benchmark --config configs/benchmark/embedded_cpu.yaml [--pro]
"""

from __future__ import annotations

import argparse
import copy
import os
from argparse import Namespace
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from anomalib.metrics import AUPRO, Evaluator
from anomalib.pipelines import Benchmark
from anomalib.pipelines.benchmark.generator import BenchmarkJobGenerator
from anomalib.pipelines.components.base import Runner
from anomalib.pipelines.components.utils import get_iterator_from_grid_dict

__all__ = ["markdown_table", "run_benchmark", "split_by_model"]

#: Columns of the markdown summary, in order, when present.
SUMMARY_COLUMNS = ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score", "pixel_AUPRO", "fit_duration",
                   "test_duration")


class _ProJobGenerator(BenchmarkJobGenerator):
    """anomalib's job generator, with ``pixel_AUPRO`` added to each model's test metrics."""

    def generate_jobs(self, args: dict, previous_stage_result: object) -> Generator:
        for job in super().generate_jobs(args, previous_stage_result):
            if isinstance(job.model.evaluator, Evaluator):
                job.model.evaluator.test_metrics.append(AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_",
                                                              strict=False))
            yield job


class _ProBenchmark(Benchmark):
    """anomalib's ``Benchmark`` whose jobs also measure PRO."""

    @staticmethod
    def _setup_runners(args: dict) -> list[Runner]:
        runners = Benchmark._setup_runners(args)
        for runner in runners:
            runner.generator = _ProJobGenerator(runner.generator.accelerator)
        return runners


def split_by_model(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One anomalib benchmark config per entry of ``benchmark.model.grid`` (the config itself if there is none)."""
    model = config["benchmark"]["model"]
    if not (isinstance(model, dict) and isinstance(model.get("grid"), list)):
        return [config]
    configs = []
    for entry in model["grid"]:
        single = copy.deepcopy(config)
        single["benchmark"]["model"] = copy.deepcopy(entry)
        configs.append(single)
    return configs


def _absolute_data_root(config: dict[str, Any], base: Path) -> dict[str, Any]:
    """The config with a relative ``data.init_args.root`` made absolute against ``base`` (the runs change folder)."""
    config = copy.deepcopy(config)
    init_args = config["benchmark"].get("data", {}).get("init_args", {})
    root = init_args.get("root")
    if isinstance(root, str) and not Path(root).is_absolute():
        init_args["root"] = str((base / root).resolve())
    return config


def _model_label(config: dict[str, Any]) -> str:
    class_path = config["benchmark"]["model"]["class_path"]
    return str(class_path).rsplit(".", 1)[-1]


@contextmanager
def _working_directory(folder: Path) -> Iterator[None]:
    """Run inside ``folder`` (``contextlib.chdir`` needs Python 3.11; the package supports 3.10)."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _run_one(config: dict[str, Any], folder: Path, pro: bool = False) -> pd.DataFrame:
    """anomalib's ``Benchmark`` on one model's config, inside ``folder``; its table, checked complete."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    expected = len(list(get_iterator_from_grid_dict(config["benchmark"])))
    with _working_directory(folder):
        (_ProBenchmark if pro else Benchmark)().run(Namespace(config=config_path))
    csvs = sorted(folder.glob("runs/benchmark/*/results.csv"))
    table = pd.read_csv(csvs[-1]) if csvs else pd.DataFrame()
    if len(table) != expected:
        msg = (
            f"anomalib's benchmark of {_model_label(config)} finished {len(table)} of {expected} jobs; "
            f"see {folder / 'runs' / 'pipeline.log'} for the error."
        )
        raise RuntimeError(msg)
    return table


def run_benchmark(config_path: Path, output: Path, pro: bool = False) -> pd.DataFrame:
    """Run anomalib's benchmark per model of ``config_path``; write and return the merged table.

    ``pro`` adds anomalib's ``AUPRO`` to every model's test metrics (column ``pixel_AUPRO``).
    """
    config = yaml.safe_load(Path(config_path).read_text())
    config = _absolute_data_root(config, Path.cwd())
    tables = []
    for index, single in enumerate(split_by_model(config)):
        tables.append(_run_one(single, output.resolve() / f"{index:02d}_{_model_label(single)}", pro))
    merged = pd.concat(tables, ignore_index=True, sort=False)
    output.mkdir(parents=True, exist_ok=True)
    merged.to_csv(output / "results.csv", index=False)
    (output / "results.md").write_text(markdown_table(merged) + "\n")
    return merged


def markdown_table(results: pd.DataFrame) -> str:
    """One row per model and category: the test metrics and the pipeline's fit and test seconds."""
    model_column = "model.class_path"
    category_column = "data.init_args.category"
    columns = [c for c in SUMMARY_COLUMNS if c in results.columns]
    header = "| model | category | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for _, row in results.iterrows():
        values = [f"{row[c]:.3f}" if "duration" not in c else f"{row[c]:.1f}" for c in columns]
        category = row.get(category_column, "")
        lines.append(f"| {str(row[model_column]).rsplit('.', 1)[-1]} | {category} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="anomalib benchmark config (model grid allowed)")
    parser.add_argument("--output", type=Path, default=Path("results/benchmark"))
    parser.add_argument("--pro", action="store_true", help="also measure PRO (anomalib's AUPRO, pixel_AUPRO)")
    args = parser.parse_args()
    results = run_benchmark(args.config, args.output, args.pro)
    print(markdown_table(results))
    print(f"\nmerged table: {args.output / 'results.csv'} and {args.output / 'results.md'}")


if __name__ == "__main__":
    main()
