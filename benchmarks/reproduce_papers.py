"""Reproduce the papers' MVTec AD tables in one command, with the papers' numbers beside the measured ones.

    python benchmarks/reproduce_papers.py                       # online CUDA machine, repository root
    python benchmarks/reproduce_papers.py --embedded            # offline dry run: embedded data, random-init CPU

Online it downloads MVTec AD through anomalib and the ImageNet weights through timm (it stops with a clear
message where it cannot), then

1. runs MLFF, MFFA, PatchCore and PaDiM on every category through anomalib's benchmark pipeline
   (``configs/benchmark/mvtec_gpu.yaml`` via :mod:`anomalib_mlff.pipelines.benchmark`);
2. runs F2PAD's cut-paste protocol on PatchCore and PaDiM (as ``bench_f2pad.py``; resnet18 as in F2PAD's paper)
   on F2PAD's six categories;
3. writes ``<output>/papers.md`` (paper | measured for every number of ``paper_results.yaml``) and
   ``<output>/papers.png`` (bar chart of the means).

``--embedded`` swaps in the embedded data, ``configs/benchmark/embedded_cpu.yaml`` and short F2PAD solves.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

from anomalib_mlff.data import EMBEDDED_CATEGORIES, EMBEDDED_ROOT
from anomalib_mlff.evaluation.measure import fit_and_measure
from anomalib_mlff.evaluation.protocols import build_paper
from anomalib_mlff.figures import bar_chart
from anomalib_mlff.pipelines.benchmark import run_benchmark

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs" / "benchmark"
PAPER_RESULTS = HERE / "paper_results.yaml"
MODELS = ("MLFF", "MFFA", "Patchcore", "Padim")
MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                    "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
F2PAD_CATEGORIES = ("hazelnut", "leather", "metal_nut", "capsule", "tile", "wood")  # F2PAD's Table I
#: Short solves for the offline dry run (it checks the path, not F2PAD's accuracy).
DRY_RUN_F2PAD = {"max_iterations": 20, "reestimation_iterations": 5}
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


def benchmark_config(base: Path, root: Path, categories: Sequence[str]) -> dict:
    """``base`` restricted to the papers' four models, on ``root`` and ``categories``."""
    config = yaml.safe_load(base.read_text())
    grid = config["benchmark"]["model"]["grid"]
    config["benchmark"]["model"]["grid"] = [entry for entry in grid if entry["class_path"] in MODELS]
    init_args = config["benchmark"]["data"]["init_args"]
    init_args["root"] = str(root)
    init_args["category"] = {"grid": list(categories)}
    return config


def f2pad_rows(root: Path, categories: Sequence[str], images: int, pre_trained: bool, dry_run: bool,
               work: Path) -> list[dict]:
    """F2PAD's cut-paste protocol on PatchCore and PaDiM: one row per model and category."""
    rows = []
    settings = DRY_RUN_F2PAD if dry_run else None
    for category in categories:
        build_paper(work / "cutpaste", category, images, seed=0, source_root=root)
        for name, model in (("PatchCore", "Patchcore"), ("PaDiM", "Padim")):
            [row], _ = fit_and_measure(name, category, {"paper": work / "cutpaste"}, 0, work / "f2pad", settings,
                                       {"pre_trained": pre_trained})
            rows += [
                {"model": model, "category": category, "metric": "IoU", "value": row.iou_before},
                {"model": f"F2PAD {model}", "category": category, "metric": "IoU", "value": row.iou_after},
                {"model": model, "category": category, "metric": "Dice", "value": row.dice_before},
                {"model": f"F2PAD {model}", "category": category, "metric": "Dice", "value": row.dice_after},
            ]
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
                             "value": 100 * float(line[source])})
    return rows


def comparison(measured: pd.DataFrame, papers: list[dict]) -> pd.DataFrame:
    """Paper and measured value for every (paper table, model, metric, category), means included."""
    if not measured.empty:
        means = measured.groupby(["model", "metric"], as_index=False)["value"].mean().assign(category="mean")
        measured = pd.concat([measured, means], ignore_index=True)
    found = {(r.model, r.metric, r.category): r.value for r in measured.itertuples()}
    rows = []
    for block in papers:
        for model, values in block["values"].items():
            for category, value in values.items():
                rows.append({
                    "source": f"{block['paper']}, Table {block['table']}", "model": model, "metric": block["metric"],
                    "category": category, "paper": value, "measured": found.get((model, block["metric"], category)),
                })
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, header: str) -> str:
    lines = [header, "", "| source | model | metric | category | paper | measured |", "|---|---|---|---|---|---|"]
    for r in table.itertuples():
        measured = "-" if r.measured is None or pd.isna(r.measured) else f"{r.measured:.1f}"
        lines.append(f"| {r.source} | {r.model} | {r.metric} | {r.category} | {r.paper:.1f} | {measured} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedded", action="store_true", help="offline dry run on the embedded data, CPU sizes")
    parser.add_argument("--root", type=Path, help="dataset root (default ./datasets/MVTecAD; embedded: the package's)")
    parser.add_argument("--categories", nargs="+", help="benchmark categories (default: all of the dataset)")
    parser.add_argument("--f2pad-categories", nargs="+", help="F2PAD protocol categories (default: the paper's 6)")
    parser.add_argument("--f2pad-images", type=int, default=54, help="cut-paste test images per category")
    parser.add_argument("--config", type=Path, help="benchmark config (default: mvtec_gpu.yaml / embedded_cpu.yaml)")
    parser.add_argument("--output", type=Path, default=Path("results/papers"))
    args = parser.parse_args()

    root = (args.root or (EMBEDDED_ROOT if args.embedded else Path("datasets/MVTecAD"))).resolve()
    categories = args.categories or list(EMBEDDED_CATEGORIES if args.embedded else MVTEC_CATEGORIES)
    f2pad_categories = args.f2pad_categories or list(EMBEDDED_CATEGORIES if args.embedded else F2PAD_CATEGORIES)
    config_path = args.config or CONFIGS / ("embedded_cpu.yaml" if args.embedded else "mvtec_gpu.yaml")
    if not args.embedded:
        download(root, sorted({*categories, *f2pad_categories}),
                 ("resnet18", "resnet50", "wide_resnet50_2", "cait_m36_384"))

    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = work / "benchmark.yaml"
        config.write_text(yaml.safe_dump(benchmark_config(config_path, root, categories), sort_keys=False))
        table = run_benchmark(config, args.output / "benchmark")
        rows = measured_rows(table)
        rows += f2pad_rows(root, f2pad_categories, args.f2pad_images, not args.embedded, args.embedded, work)

    papers = yaml.safe_load(PAPER_RESULTS.read_text())
    result = comparison(pd.DataFrame(rows, columns=["model", "category", "metric", "value"]), papers)
    setting = "embedded data, random-init CPU dry run (not comparable to the papers)" if args.embedded else "MVTec AD"
    (args.output / "papers.md").write_text(markdown(result, f"Papers vs measured ({setting}), percent"))
    means = result[result["category"] == "mean"]
    bars = {f"{r.model}\n{r.metric}": {"paper": r.paper, **({"measured": r.measured} if pd.notna(r.measured) else {})}
            for r in means.itertuples()}
    bar_chart(bars, f"Papers' means vs measured ({setting})", args.output / "papers.png")
    print((args.output / "papers.md").read_text())
    print(f"table: {args.output / 'papers.md'}\nchart: {args.output / 'papers.png'}\n"
          f"benchmark: {args.output / 'benchmark' / 'results.csv'}")


if __name__ == "__main__":
    main()
