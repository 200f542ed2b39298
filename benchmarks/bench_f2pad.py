"""F2PAD benchmark on the embedded data, following the paper's protocol (F2PAD, Sec. IV-A).

Test set: cut-paste defects (paper Eq. 16), X = (1 - M) * X_normal + M * A, with A a random colour
and M a real defect mask of the same category (from ``ground_truth/``), randomly rescaled and placed
on a normal test image; a colour closer than ``MIN_COLOUR_DISTANCE`` to the pixels it covers is
redrawn. Models: anomalib's PatchCore and PaDiM on resnet18 (random initialisation: no ImageNet
weights here), 256 px. The backbone mask uses the F1-optimal pixel threshold on the cut-paste set
(the paper's choice, after PaDiM). Reports IoU and DICE (x100, mean over images) of the backbone's
mask and of F2PAD's, and seconds per image of the test pass with and without F2PAD.

    python benchmarks/bench_f2pad.py                       # both categories, 12 test images each
    python benchmarks/bench_f2pad.py --categories brick --images 4
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.metrics import Evaluator
from anomalib.models import Padim, Patchcore
from lightning.pytorch import seed_everything
from PIL import Image

from anomalib_mlff import F2PAD, Dice, IoU
from anomalib_mlff.data import EMBEDDED_ROOT

MIN_COLOUR_DISTANCE = 0.3
SCALE_RANGE = (0.75, 1.5)


def cut_paste(normal: np.ndarray, mask_source: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One defective image (Eq. 16) from a normal RGB image in [0, 1] and a binary defect mask."""
    rows, cols = np.nonzero(mask_source)
    shape = mask_source[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = normal.shape[:2]
    scale = rng.uniform(*SCALE_RANGE)
    new_size = (
        max(2, min(width - 2, round(shape.shape[1] * scale))),
        max(2, min(height - 2, round(shape.shape[0] * scale))),
    )
    shape = np.asarray(Image.fromarray(shape.astype(np.uint8) * 255).resize(new_size, Image.NEAREST)) > 0
    if rng.random() < 0.5:
        shape = shape[:, ::-1]
    top = rng.integers(0, height - shape.shape[0] + 1)
    left = rng.integers(0, width - shape.shape[1] + 1)
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + shape.shape[0], left : left + shape.shape[1]] = shape
    while True:
        colour = rng.random(3)
        if np.linalg.norm(normal[mask] - colour, axis=1).mean() >= MIN_COLOUR_DISTANCE:
            break
    defective = np.where(mask[..., None], colour, normal)
    return defective, mask


def build_dataset(root: Path, category: str, images: int, seed: int, source_root: Path = EMBEDDED_ROOT) -> None:
    """MVTec-layout copy of a category of ``source_root``: its training images and a cut-paste test set."""
    rng = np.random.default_rng(seed)
    source = source_root / category
    shutil.copytree(source / "train", root / category / "train")
    normals = sorted((source / "test" / "good").glob("*.png"))
    masks = sorted((source / "ground_truth").glob("*/*.png"))
    test_dir = root / category / "test" / "cutpaste"
    truth_dir = root / category / "ground_truth" / "cutpaste"
    test_dir.mkdir(parents=True)
    truth_dir.mkdir(parents=True)
    for index in range(images):
        normal = np.asarray(Image.open(normals[index % len(normals)]).convert("RGB"), dtype=np.float64) / 255
        mask_source = np.asarray(Image.open(masks[rng.integers(len(masks))])) > 0
        defective, mask = cut_paste(normal, mask_source, rng)
        Image.fromarray(np.round(defective * 255).astype(np.uint8)).save(test_dir / f"{index:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(truth_dir / f"{index:03d}_mask.png")


def mask_evaluator() -> Evaluator:
    """IoU and DICE of ``pred_mask``: the backbone's mask with F2PAD disabled, F2PAD's mask with it enabled."""
    return Evaluator(val_metrics=[], test_metrics=[metric(fields=["pred_mask", "gt_mask"]) for metric in (IoU, Dice)])


@dataclass
class Row:
    """One table row."""

    model: str
    category: str
    iou_before: float
    iou_after: float
    dice_before: float
    dice_after: float
    backbone_seconds: float
    f2pad_seconds: float


def run(
    model_name: str,
    category: str,
    root: Path,
    images: int,
    seed: int,
    out: Path,
    pre_trained: bool = False,
    f2pad_settings: dict | None = None,
) -> Row:
    """Fit one model (resnet18, as the paper), test it without and with F2PAD (``f2pad_settings`` over its defaults)."""
    seed_everything(seed, workers=True)
    shared = {"backbone": "resnet18", "pre_trained": pre_trained}
    settings = f2pad_settings or {}
    builders = {
        "PatchCore": lambda: Patchcore(
            **shared, layers=("layer2", "layer3"), post_processor=F2PAD(**settings), evaluator=mask_evaluator()
        ),
        "PaDiM": lambda: Padim(**shared, post_processor=F2PAD(**settings), evaluator=mask_evaluator()),
    }
    model = builders[model_name]()
    datamodule = MVTecAD(root=root, category=category, train_batch_size=16, eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=out / model_name / category, logger=False, enable_progress_bar=False, max_epochs=1)
    engine.fit(model, datamodule=datamodule)
    model.post_processor.enabled = False  # plain PostProcessor: the backbone's mask at the F1-optimal threshold
    start = time.perf_counter()
    before = engine.test(model, datamodule=datamodule, verbose=False)[0]
    backbone_seconds = (time.perf_counter() - start) / images
    model.post_processor.enabled = True
    start = time.perf_counter()
    after = engine.test(model, datamodule=datamodule, verbose=False)[0]
    f2pad_seconds = (time.perf_counter() - start) / images
    return Row(
        model=model_name,
        category=category,
        iou_before=100 * before["IoU"],
        iou_after=100 * after["IoU"],
        dice_before=100 * before["Dice"],
        dice_after=100 * after["Dice"],
        backbone_seconds=backbone_seconds,
        f2pad_seconds=f2pad_seconds,
    )


def main() -> None:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", nargs="+", default=["brick", "grass"])
    parser.add_argument("--models", nargs="+", default=["PatchCore", "PaDiM"])
    parser.add_argument("--images", type=int, default=12, help="cut-paste test images per category")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cutpaste"
        for category in args.categories:
            build_dataset(root, category, args.images, args.seed)
            results = Path(tmp) / "results"
            rows.extend(run(name, category, root, args.images, args.seed, results) for name in args.models)
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}")
    print(
        "| model | category | IoU before | IoU after | gain | DICE before | DICE after | gain "
        "| s/img backbone | s/img with F2PAD |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model_name in args.models:
        selected = [row for row in rows if row.model == model_name]
        for row in [*selected, _mean(selected)]:
            print(
                f"| {row.model} | {row.category} "
                f"| {row.iou_before:.1f} | {row.iou_after:.1f} | {row.iou_after - row.iou_before:+.1f} "
                f"| {row.dice_before:.1f} | {row.dice_after:.1f} | {row.dice_after - row.dice_before:+.1f} "
                f"| {row.backbone_seconds:.2f} | {row.f2pad_seconds:.2f} |"
            )


def _mean(rows: list[Row]) -> Row:
    numeric = [name for name in Row.__dataclass_fields__ if name not in {"model", "category"}]
    values = {name: float(np.mean([getattr(row, name) for row in rows])) for name in numeric}
    return Row(model=rows[0].model, category="**mean**", **values)


if __name__ == "__main__":
    main()
