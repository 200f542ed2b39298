"""Train and test MLFF against anomalib's Patchcore and Padim on one anomalib datamodule.

All models use the same backbone and the same random initialisation (``seed_everything``
before each model is built; ``pre_trained=False`` by default, since no ImageNet weights can be
downloaded here). Prints one table: image AUROC, pixel AUROC, PRO (anomalib's AUPRO), fit
seconds and test milliseconds per image.

    python benchmarks/compare_models.py                       # embedded "brick" data
    python benchmarks/compare_models.py --category grass --mlff-epochs 10
    python benchmarks/compare_models.py --datamodule-root ./datasets/MVTecAD --category bottle --image-size 256
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models import Padim, Patchcore
from anomalib.models.components import AnomalibModule
from lightning.pytorch import seed_everything

from anomalib_mlff.data import EMBEDDED_ROOT
from anomalib_mlff.demo import demo_evaluator
from anomalib_mlff.models.mlff import MLFF


@dataclass
class Result:
    """One table row."""

    name: str
    image_auroc: float
    pixel_auroc: float
    pro: float
    fit_seconds: float
    test_ms_per_image: float


def run(name: str, build: Callable[[], AnomalibModule], datamodule: MVTecAD, epochs: int, seed: int, out: Path) -> Result:
    """Fit and test one model, timing both phases."""
    seed_everything(seed, workers=True)
    model = build()
    engine = Engine(default_root_dir=out / name, max_epochs=epochs, logger=False, enable_progress_bar=False)
    start = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = engine.test(model, datamodule=datamodule, verbose=False)[0]
    test_seconds = time.perf_counter() - start
    return Result(
        name=name,
        image_auroc=metrics["image_AUROC"],
        pixel_auroc=metrics["pixel_AUROC"],
        pro=metrics["pixel_AUPRO"],
        fit_seconds=fit_seconds,
        test_ms_per_image=1000 * test_seconds / len(datamodule.test_data),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datamodule-root", type=Path, default=EMBEDDED_ROOT)
    parser.add_argument("--category", default="brick")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--pre-trained", action="store_true")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--mlff-epochs", type=int, default=6)
    parser.add_argument("--mlff-repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", type=Path, default=Path("results/benchmark"))
    args = parser.parse_args()

    size = (args.image_size, args.image_size)
    common = {"backbone": args.backbone, "pre_trained": args.pre_trained, "evaluator": demo_evaluator()}
    builders: dict[str, tuple[Callable[[], AnomalibModule], int]] = {
        "MLFF": (
            lambda: MLFF(
                **common,
                feature_dim=128,
                tem_levels=32,
                repeat=args.mlff_repeat,
                learning_rate=0.01,
                pre_processor=MLFF.configure_pre_processor(image_size=size),
            ),
            args.mlff_epochs,
        ),
        "Patchcore": (
            lambda: Patchcore(
                **common,
                coreset_sampling_ratio=0.1,
                pre_processor=Patchcore.configure_pre_processor(image_size=size, center_crop_size=size),
            ),
            1,
        ),
        "Padim": (lambda: Padim(**common, pre_processor=Padim.configure_pre_processor(image_size=size)), 1),
    }
    rows = []
    for name, (build, epochs) in builders.items():
        datamodule = MVTecAD(
            root=args.datamodule_root, category=args.category, train_batch_size=16, eval_batch_size=16, num_workers=0
        )
        rows.append(run(name, build, datamodule, epochs, args.seed, args.output))
    print(f"\nbackbone={args.backbone} pre_trained={args.pre_trained} image_size={args.image_size} "
          f"category={args.category} torch_threads={torch.get_num_threads()}")
    print("| model | image AUROC | pixel AUROC | PRO | fit s | test ms/image |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.image_auroc:.3f} | {r.pixel_auroc:.3f} | {r.pro:.3f} | {r.fit_seconds:.1f} | "
              f"{r.test_ms_per_image:.1f} |")


if __name__ == "__main__":
    main()
