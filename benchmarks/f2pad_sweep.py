"""Fast F2PAD variant sweep for development: fit once, cache the backbone's masks, refine with each variant.

bench_f2pad.py runs whole Engine passes (old code vs new); this script answers "which setting helps" in
minutes. ``prepare`` builds both protocols of bench_f2pad.py (``--seed``: 1 by default, so that choices made
here are not shaped on bench_f2pad.py's seed-0 images), fits PatchCore and PaDiM per category and caches
every defective test image with its initial (F1-optimal) mask and ground truth. ``run TAG JSON`` refines every
cached image with ``F2PADSettings`` overrides (JSON) and stores |A|; ``table TAG`` prints mean IoU per
(model, category, protocol) for the run's own mask and for fixed, hysteresis and Otsu |A| thresholds.

    python benchmarks/f2pad_sweep.py prepare
    python benchmarks/f2pad_sweep.py run paper_start '{"starts": ["mask"]}'
    python benchmarks/f2pad_sweep.py run defaults '{}'
    python benchmarks/f2pad_sweep.py run brick_padim '{}' --categories brick --models PaDiM --protocols realistic
    python benchmarks/f2pad_sweep.py table defaults
    python benchmarks/f2pad_sweep.py bounds

``bounds`` needs no run: per group, the best IoU any mask confined to R can reach (the ground truth inside R),
the same for R grown from the backbone's map at 0.8 x the initial threshold (and R's share of the image), and how
many defects reach the top 1% of the backbone's own map, i.e. whether the backbone finds the defect at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import seed_everything
from skimage.filters import apply_hysteresis_threshold, threshold_otsu

sys.path.insert(0, str(Path(__file__).parent))
import bench_f2pad as bench  # noqa: E402

from anomalib_mlff import F2PAD  # noqa: E402
from anomalib_mlff.components.normalization import PixelRange  # noqa: E402
from anomalib_mlff.post_processing.f2pad import F2PADSettings, refine  # noqa: E402
from anomalib_mlff.post_processing.f2pad.scorers import build_scorer  # noqa: E402
from anomalib_mlff.post_processing.f2pad.window import dilate  # noqa: E402

OUT = Path(os.environ.get("F2PAD_SWEEP_DIR", "/tmp/f2pad_sweep"))
CATEGORIES, NAMES = ("brick", "grass"), ("PatchCore", "PaDiM")
DILATION = F2PADSettings().dilation  # the region R the mask rules are confined to


def iou(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def prepare(category: str, name: str, images: int, seed: int) -> None:
    """Fit one model on one category; cache (image in [0, 1], initial mask, gt) per protocol."""
    roots = {p: OUT / f"data_{category}" / p for p in ("paper", "realistic")}
    if not (roots["paper"] / category).exists():
        bench.build_paper(roots["paper"], category, images, seed)
        bench.build_realistic(roots["realistic"], category, images, images, seed)
    seed_everything(seed, workers=True)
    model = bench.MODELS[name](**bench.ARGUMENTS[name], post_processor=F2PAD(enabled=False),
                               evaluator=bench.evaluator())
    engine = bench.engine_for(OUT / "runs" / name / category)
    engine.fit(model, datamodule=bench.datamodule(roots["paper"], category))
    engine.trainer.save_checkpoint(OUT / f"{name}_{category}.ckpt")
    pixel_range, data = PixelRange.of_model(model), {}
    for protocol, root in roots.items():
        module = bench.datamodule(root, category)
        engine.validate(model, datamodule=module, verbose=False)  # this protocol's F1-optimal threshold
        data[protocol] = [
            {"path": batch.image_path[i], "image": pixel_range.to_unit(batch.image[i : i + 1]).clamp(0, 1)[0],
             "initial": batch.pred_mask[i].reshape(batch.image.shape[-2:]).bool(),
             "gt": batch.gt_mask[i].reshape(batch.image.shape[-2:]).bool()}
            for batch in engine.predict(model, dataloaders=module.test_dataloader())
            for i in range(batch.image.shape[0]) if batch.gt_mask[i].any()
        ]
    torch.save(data, OUT / f"{name}_{category}.pt")


def run(tag: str, overrides: dict, categories: list[str], models: list[str], protocols: list[str]) -> None:
    """Refine every cached image of the given groups with the overridden settings; one JSON line each."""
    records = []
    for category in categories:
        for name in models:
            model = bench.MODELS[name].load_from_checkpoint(OUT / f"{name}_{category}.ckpt", post_processor=F2PAD())
            model.eval()
            post = model.post_processor
            settings = replace(F2PADSettings(), **overrides)  # this code's defaults, not the checkpoint's
            scorer = build_scorer(model.model, PixelRange.of_model(model), settings.num_candidates)
            for protocol, items in torch.load(OUT / f"{name}_{category}.pt").items():
                if protocol not in protocols:
                    continue
                for index, item in enumerate(items):
                    start = time.perf_counter()
                    with torch.enable_grad():
                        result = refine(item["image"][None], item["initial"][None], scorer, post.inpainter,
                                        post.pixel_prior, settings, working_size=post.model_input_size)
                    record = {"model": name, "category": category, "protocol": protocol, "index": index,
                              "seconds": time.perf_counter() - start, "iterations": int(result.iterations[0]),
                              "fallback": bool(result.fallback[0]), "explained": float(result.explained[0]),
                              "iou_before": iou(item["initial"], item["gt"]),
                              "iou_after": iou(result.pred_mask[0], item["gt"]),
                              "magnitude": result.magnitude[0].half().tolist()}
                    records.append(record)
                    print(json.dumps({k: v for k, v in record.items() if k != "magnitude"}), flush=True)
    torch.save(records, OUT / f"run_{tag}.pt")


def _otsu(magnitude: np.ndarray, region: np.ndarray, floor: float) -> np.ndarray:
    values = magnitude[region]
    if values.size < 2 or values.max() <= floor:
        return magnitude > floor
    return magnitude > max(floor, threshold_otsu(values))


RULES = {
    "A>0.1": lambda m, r: m > 0.1,
    "A>0.05": lambda m, r: m > 0.05,
    "hyst .05/.15": lambda m, r: apply_hysteresis_threshold(m, 0.05, 0.15),
    "otsu >=.03": lambda m, r: _otsu(m, r, 0.03),
}


def table(tag: str) -> None:
    """Mean IoU x100 per group, mean gain per (model, protocol), worst category gain, s/img and iterations."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    caches = {}
    for record in torch.load(OUT / f"run_{tag}.pt"):
        key = (record["model"], record["category"])
        if key not in caches:
            caches[key] = torch.load(OUT / f"{key[0]}_{key[1]}.pt")
        item = caches[key][record["protocol"]][record["index"]]
        magnitude, gt = np.asarray(record["magnitude"], dtype=np.float32), item["gt"].numpy()
        region = dilate(item["initial"][None], DILATION)[0].numpy()
        group = groups[(record["model"], record["category"], record["protocol"])]
        group["before"].append(record["iou_before"])
        group["run"].append(record["iou_after"])
        group["s/img"].append(record["seconds"])
        group["iter"].append(record["iterations"])
        for rule, mask_of in RULES.items():
            group[rule].append(iou(mask_of(magnitude, region) & region, gt))
    masks = ["run", *RULES]
    print("| model | category | protocol | before | " + " | ".join(masks) + " | s/img | iterations |")
    print("|---" * (6 + len(masks)) + "|")
    for (model, category, protocol), group in sorted(groups.items()):
        ious = " | ".join(f"{100 * np.mean(group[c]):.1f}" for c in ["before", *masks])
        print(f"| {model} | {category} | {protocol} | {ious} | {np.mean(group['s/img']):.1f} "
              f"| {np.mean(group['iter']):.0f} |")
    print("\n| model | protocol | " + " | ".join(f"{c} gain (worst)" for c in masks) + " |")
    print("|---" * (2 + len(masks)) + "|")
    for model, protocol in sorted({(k[0], k[2]) for k in groups}):
        cats = [groups[(model, c, protocol)] for c in CATEGORIES if (model, c, protocol) in groups]
        cells = []
        for column in masks:
            gains = [100 * (np.mean(g[column]) - np.mean(g["before"])) for g in cats]
            cells.append(f"{np.mean(gains):+.1f} ({min(gains):+.1f})")
        print(f"| {model} | {protocol} | " + " | ".join(cells) + " |")


def bounds() -> None:
    """What F2PAD can reach inside R, and whether the backbone's map points at the defect at all."""
    print("| model | category | protocol | images | IoU before | best in R | best in R at 0.8 x threshold (R's area) "
          "| defect in the map's top 1% |")
    print("|---" * 8 + "|")
    for category in CATEGORIES:
        for name in NAMES:
            model = bench.MODELS[name].load_from_checkpoint(OUT / f"{name}_{category}.ckpt", post_processor=F2PAD())
            model.eval()
            pixel_range = PixelRange.of_model(model)
            for protocol, items in torch.load(OUT / f"{name}_{category}.pt").items():
                rows = []
                for item in items:
                    with torch.no_grad():
                        raw = model.model(pixel_range.from_unit(item["image"][None])).anomaly_map
                    raw = raw.reshape(item["gt"].shape)
                    gt, initial = item["gt"], item["initial"]
                    threshold = raw[initial].min() if initial.any() else torch.inf  # the initial mask's threshold
                    region = dilate(initial[None], DILATION)[0]
                    grown = dilate((raw >= 0.8 * threshold)[None], DILATION)[0]
                    rows.append((iou(initial, gt), iou(gt & region, gt), iou(gt & grown, gt), grown.float().mean(),
                                 bool(raw[gt].max() >= raw.quantile(0.99))))
                before, inside, wider, area, found = (np.mean([float(row[i]) for row in rows]) for i in range(5))
                print(f"| {name} | {category} | {protocol} | {len(rows)} | {100 * before:.1f} | {100 * inside:.1f} "
                      f"| {100 * wider:.1f} ({100 * area:.0f}%) | {round(found * len(rows))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "run", "table", "bounds"])
    parser.add_argument("tag", nargs="?", default="default")
    parser.add_argument("overrides", nargs="?", default="{}",
                        help="F2PADSettings overrides as JSON")
    parser.add_argument("--images", type=int, default=6, help="images per protocol part (cut-paste, real, material)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES,
                        help="run: categories to refine")
    parser.add_argument("--models", nargs="+", default=list(NAMES), choices=NAMES, help="run: models to refine")
    parser.add_argument("--protocols", nargs="+", default=["paper", "realistic"], choices=["paper", "realistic"],
                        help="run: protocols to refine")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.command == "prepare":
        for category in CATEGORIES:
            for name in NAMES:
                prepare(category, name, args.images, args.seed)
    elif args.command == "run":
        run(args.tag, json.loads(args.overrides), args.categories, args.models, args.protocols)
    elif args.command == "bounds":
        bounds()
    else:
        table(args.tag)


if __name__ == "__main__":
    main()
