"""Reproduce the papers' MVTec AD tables in one command, with the papers' numbers beside the measured ones.

    python benchmarks/reproduce_papers.py                       # online CUDA machine, repository root
    python benchmarks/reproduce_papers.py --embedded            # offline dry run: embedded data, random-init CPU

Online it downloads MVTec AD through anomalib and the ImageNet weights through timm (it stops with a clear
message where it cannot), then

1. runs MLFF, MFFA, PatchCore and PaDiM on every category through anomalib's benchmark pipeline
   (``configs/benchmark/mvtec_gpu.yaml`` via :mod:`anomalib_mlff.pipelines.benchmark`, PRO included), each at
   the settings of the paper whose numbers it is compared with (:data:`PAPER_MODEL_ARGUMENTS`): PaDiM as the
   PaDiM paper that MLFF's tables quote (WideResNet-50, 550 dimensions), torchvision's ImageNet weights
   (timm's ``*.tv_in1k`` tags) where the papers' code used them;
2. runs F2PAD's cut-paste protocol on PatchCore and PaDiM (resnet18, as F2PAD's paper) on its six categories,
   with the test set built as the paper did (54 training images per category held out of training and given
   a cut-paste defect), twice: F2PAD as published (``F2PAD(preset="paper")``, the column compared with the
   paper) and at the project's defaults (a second, labelled column);
3. writes ``<output>/papers.md`` (paper | measured | F2PAD defaults for every number of ``paper_results.yaml``,
   then the settings of every run), ``<output>/settings.yaml`` (the same settings, exactly) and
   ``<output>/papers.png`` (bar chart of the means).

``--embedded`` swaps in the embedded data, ``configs/benchmark/embedded_cpu.yaml`` with its random-init CPU
settings, random-init resnet18 for F2PAD's models and short F2PAD solves; the settings record says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from anomalib_mlff.data import EMBEDDED_CATEGORIES, EMBEDDED_ROOT
from anomalib_mlff.evaluation.measure import MODEL_ARGUMENTS, fit_and_measure
from anomalib_mlff.evaluation.protocols import build_paper
from anomalib_mlff.figures import bar_chart
from anomalib_mlff.pipelines.benchmark import run_benchmark
from anomalib_mlff.post_processing.f2pad import F2PAD

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs" / "benchmark"
PAPER_RESULTS = HERE / "paper_results.yaml"
MODELS = ("MLFF", "MFFA", "Patchcore", "Padim")
MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                    "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
F2PAD_CATEGORIES = ("hazelnut", "leather", "metal_nut", "capsule", "tile", "wood")  # F2PAD's Table I
#: F2PAD paper, Sec. IV-A1: 54 test images per category, 165-337 training images (MVTec AD's less 54).
F2PAD_TEST_IMAGES = 54

#: Online runs: each benchmark model at the settings of the paper its numbers are compared with, on top of
#: the config's ``init_args``. PaDiM: the PaDiM paper's WideResNet-50 with 550 dimensions, the column MLFF's
#: Tables 1-2 quote. PatchCore: its paper's WideResNet-50. The PaDiM and PatchCore code bases load
#: torchvision's weights; MLFF's (ResNet-50) and MFFA's (WideResNet-50) papers say only "ImageNet", and
#: torchvision's are assumed, the PyTorch weights of the peers they build on. CaiT has timm's weights only.
PAPER_MODEL_ARGUMENTS: dict[str, dict[str, Any]] = {
    "MLFF": {"backbone": "resnet50.tv_in1k"},
    "MFFA": {"backbone": "wide_resnet50_2.tv_in1k"},
    "Patchcore": {"backbone": "wide_resnet50_2.tv_in1k"},
    "Padim": {"backbone": "wide_resnet50_2.tv_in1k", "n_features": 550},
}
#: F2PAD's backbones (its paper follows the official PaDiM code: torchvision's resnet18, PaDiM with 100 of its
#: 448 dimensions), on top of :data:`~anomalib_mlff.evaluation.measure.MODEL_ARGUMENTS`.
F2PAD_MODEL_ARGUMENTS: dict[str, dict[str, Any]] = {
    "PatchCore": {"backbone": "resnet18.tv_in1k", "pre_trained": True},
    "PaDiM": {"backbone": "resnet18.tv_in1k", "pre_trained": True, "n_features": 100},
}
#: The two F2PAD columns: the paper's procedure (compared with its table) and the project's defaults.
F2PAD_COLUMNS: dict[str, dict[str, Any]] = {"paper": {"preset": "paper"}, "defaults": {}}
#: Short solves for the offline dry run (it checks the path, not F2PAD's accuracy), on top of both columns.
DRY_RUN_F2PAD = {"max_iterations": 20, "reestimation_iterations": 5}
WEIGHTS = ("resnet18.tv_in1k", "resnet50.tv_in1k", "wide_resnet50_2.tv_in1k", "cait_m36_384")
OFFLINE_HINT = ("This command needs internet access (MVTec AD through anomalib, ImageNet weights through timm); "
                "offline, `--embedded` runs the same steps on the embedded data with random-init CPU settings.")


def fail(message: str) -> None:
    """Stop with ``message`` and the offline hint (exit status 3)."""
    print(f"reproduce_papers: {message}\n{OFFLINE_HINT}", file=sys.stderr)
    sys.exit(3)


def download(root: Path, categories: Sequence[str], backbones: Sequence[str]) -> None:
    """MVTec AD through anomalib's datamodule and the backbones' ImageNet weights through timm."""
    import timm  # noqa: PLC0415
    from anomalib.data import MVTecAD  # noqa: PLC0415

    for category in categories:
        try:
            MVTecAD(root=root, category=category).prepare_data()
        except Exception as error:  # noqa: BLE001 - any download failure gets the same clear message
            fail(f"could not download MVTec AD ({category}) into {root}: {type(error).__name__}: {error}")
    for backbone in backbones:
        try:
            timm.create_model(backbone, pretrained=True)
        except Exception as error:  # noqa: BLE001
            fail(f"could not download the ImageNet weights of {backbone} through timm: {type(error).__name__}: {error}")


def benchmark_config(base: Path, root: Path, categories: Sequence[str], embedded: bool) -> dict:
    """``base`` restricted to the papers' four models on ``root`` and ``categories``; online, the papers' settings."""
    config = yaml.safe_load(base.read_text())
    grid = [entry for entry in config["benchmark"]["model"]["grid"] if entry["class_path"] in MODELS]
    if not embedded:
        for entry in grid:
            entry["init_args"] = {**entry.get("init_args", {}), **PAPER_MODEL_ARGUMENTS[entry["class_path"]]}
    config["benchmark"]["model"]["grid"] = grid
    init_args = config["benchmark"]["data"]["init_args"]
    init_args["root"] = str(root)
    init_args["category"] = {"grid": list(categories)}
    return config


def f2pad_runs(embedded: bool) -> list[dict[str, Any]]:
    """Every F2PAD run: model, its arguments, the column, F2PAD's arguments and the settings they resolve to."""
    runs = []
    for name in F2PAD_MODEL_ARGUMENTS:
        arguments = {**MODEL_ARGUMENTS[name], **({} if embedded else F2PAD_MODEL_ARGUMENTS[name])}
        for column, f2pad in F2PAD_COLUMNS.items():
            f2pad = {**f2pad, **(DRY_RUN_F2PAD if embedded else {})}
            runs.append({"model": name, "model_arguments": arguments, "column": column, "f2pad_arguments": f2pad,
                         "f2pad_settings": F2PAD(**f2pad).settings.to_config()})
    return runs


def f2pad_rows(root: Path, categories: Sequence[str], images: int, runs: list[dict[str, Any]],
               work: Path) -> list[dict]:
    """F2PAD's cut-paste protocol, test images held out of training: one row per run, category and metric."""
    rows = []
    for category in categories:
        protocol = work / "cutpaste"
        build_paper(protocol, category, images, seed=0, source_root=root, hold_out=True)
        for run in runs:
            [row], _ = fit_and_measure(run["model"], category, {"paper": protocol}, 0, work / "f2pad" / run["column"],
                                       run["f2pad_arguments"], run["model_arguments"])
            model = {"PatchCore": "Patchcore", "PaDiM": "Padim"}[run["model"]]
            for metric, before, after in (("IoU", row.iou_before, row.iou_after),
                                          ("Dice", row.dice_before, row.dice_after)):
                if run["column"] == "paper":  # the backbone's own mask: the same fit in both columns
                    rows.append({"model": model, "category": category, "metric": metric, "value": before,
                                 "column": "paper"})
                rows.append({"model": f"F2PAD {model}", "category": category, "metric": metric, "value": after,
                             "column": run["column"]})
    return rows


def measured_rows(table: pd.DataFrame) -> list[dict]:
    """Long rows (model, category, metric, percent) from the merged benchmark table."""
    rows = []
    for _, line in table.iterrows():
        model = str(line["model.class_path"]).rsplit(".", 1)[-1]
        for metric in ("image_AUROC", "pixel_AUROC", "pixel_PRO"):
            source = "pixel_AUPRO" if metric == "pixel_PRO" else metric
            if source in table.columns and pd.notna(line[source]):
                rows.append({"model": model, "category": line["data.init_args.category"], "metric": metric,
                             "value": 100 * float(line[source]), "column": "paper"})
    return rows


def comparison(measured: pd.DataFrame, papers: list[dict]) -> pd.DataFrame:
    """Paper, measured and F2PAD-defaults value for every (paper table, model, metric, category), means included.

    ``measured`` holds long rows with a ``column``: ``paper`` (the run at the paper's settings) or
    ``defaults`` (F2PAD at the project's defaults).
    """
    if not measured.empty:
        keys = ["column", "model", "metric"]
        means = measured.groupby(keys, as_index=False)["value"].mean().assign(category="mean")
        measured = pd.concat([measured, means], ignore_index=True)
    found = {(r.column, r.model, r.metric, r.category): r.value for r in measured.itertuples()}
    rows = []
    for block in papers:
        for model, values in block["values"].items():
            for category, value in values.items():
                key = (model, block["metric"], category)
                rows.append({
                    "source": f"{block['paper']}, Table {block['table']}", "model": model, "metric": block["metric"],
                    "category": category, "paper": value, "measured": found.get(("paper", *key)),
                    "defaults": found.get(("defaults", *key)),
                })
    return pd.DataFrame(rows)


def _cell(value: object) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:.1f}"


def markdown(table: pd.DataFrame, header: str, settings: dict[str, Any]) -> str:
    """The comparison table, then every run's settings."""
    lines = [header, "", "`measured`: each model at the settings of the paper it is compared with (F2PAD: "
             "`preset=\"paper\"`); `F2PAD defaults`: the same F2PAD runs at the project's defaults.", "",
             "| source | model | metric | category | paper | measured | F2PAD defaults |",
             "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.source} | {r.model} | {r.metric} | {r.category} | {r.paper:.1f} | {_cell(r.measured)} "
                     f"| {_cell(r.defaults)} |")
    lines += ["", "## Settings of every run", "", f"- data: {settings['data']}",
              f"- F2PAD test set: {settings['f2pad_test_set']}"]
    for entry in settings["benchmark"]:
        lines.append(f"- benchmark {entry['class_path']}: `{entry.get('init_args', {})}`")
    for run in settings["f2pad"]:
        lines.append(f"- F2PAD {run['model']} ({run['column']}): model `{run['model_arguments']}`, "
                     f"F2PAD `{run['f2pad_arguments']}` -> `{run['f2pad_settings']}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedded", action="store_true", help="offline dry run on the embedded data, CPU sizes")
    parser.add_argument("--root", type=Path, help="dataset root (default ./datasets/MVTecAD; embedded: the package's)")
    parser.add_argument("--categories", nargs="+", help="benchmark categories (default: all of the dataset)")
    parser.add_argument("--f2pad-categories", nargs="+", help="F2PAD protocol categories (default: the paper's 6)")
    parser.add_argument("--f2pad-images", type=int, default=F2PAD_TEST_IMAGES,
                        help="training images per category held out as F2PAD's cut-paste test images (paper: 54)")
    parser.add_argument("--config", type=Path, help="benchmark config (default: mvtec_gpu.yaml / embedded_cpu.yaml)")
    parser.add_argument("--output", type=Path, default=Path("results/papers"))
    args = parser.parse_args()

    root = (args.root or (EMBEDDED_ROOT if args.embedded else Path("datasets/MVTecAD"))).resolve()
    categories = args.categories or list(EMBEDDED_CATEGORIES if args.embedded else MVTEC_CATEGORIES)
    f2pad_categories = args.f2pad_categories or list(EMBEDDED_CATEGORIES if args.embedded else F2PAD_CATEGORIES)
    config_path = args.config or CONFIGS / ("embedded_cpu.yaml" if args.embedded else "mvtec_gpu.yaml")
    if not args.embedded:
        download(root, sorted({*categories, *f2pad_categories}), WEIGHTS)

    config = benchmark_config(config_path, root, categories, args.embedded)
    runs = f2pad_runs(args.embedded)
    setting = "embedded data, random-init CPU dry run (not comparable to the papers)" if args.embedded else "MVTec AD"
    split = "as the paper" if args.f2pad_images == F2PAD_TEST_IMAGES else f"the paper held out {F2PAD_TEST_IMAGES}"
    settings = {
        "data": f"{setting} at {root}",
        "f2pad_test_set": f"{args.f2pad_images} training images per category held out of training, each given one "
                          f"cut-paste defect (seed 0) ({split})",
        "benchmark": config["benchmark"]["model"]["grid"],
        "f2pad": runs,
    }
    settings = json.loads(json.dumps(settings))  # plain YAML: tuples as lists
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "settings.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config_file = work / "benchmark.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        table = run_benchmark(config_file, args.output / "benchmark", pro=True)
        rows = measured_rows(table)
        rows += f2pad_rows(root, f2pad_categories, args.f2pad_images, runs, work)

    papers = yaml.safe_load(PAPER_RESULTS.read_text())
    result = comparison(pd.DataFrame(rows, columns=["model", "category", "metric", "value", "column"]), papers)
    (args.output / "papers.md").write_text(markdown(result, f"# Papers vs measured ({setting}), percent", settings))
    means = result[result["category"] == "mean"]
    bars = {f"{r.model}\n{r.metric}": {"paper": r.paper,
                                       **({"measured": r.measured} if pd.notna(r.measured) else {}),
                                       **({"F2PAD defaults": r.defaults} if pd.notna(r.defaults) else {})}
            for r in means.itertuples()}
    bar_chart(bars, f"Papers' means vs measured ({setting})", args.output / "papers.png")
    print((args.output / "papers.md").read_text())
    print(f"table: {args.output / 'papers.md'}\nsettings: {args.output / 'settings.yaml'}\n"
          f"chart: {args.output / 'papers.png'}\nbenchmark: {args.output / 'benchmark' / 'results.csv'}")


if __name__ == "__main__":
    main()
