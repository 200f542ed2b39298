"""F2PAD's localisation gain on a fitted anomalib model, measured the way the F2PAD paper scores it.

Each protocol's test set first sets anomalib's F1-optimal pixel threshold (``Engine.validate``: the
paper's oracle threshold), then is tested with F2PAD disabled (the backbone's own mask) and enabled.
IoU and DICE are means over images (x100); times are seconds per image of the whole test pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalib.engine import Engine
from anomalib.metrics import AnomalibMetric, Evaluator
from anomalib.models import Padim, Patchcore
from anomalib.models.components import AnomalibModule
from lightning.pytorch import seed_everything
from torchmetrics import SumMetric

from anomalib_mlff.evaluation.protocols import count_defective, protocol_datamodule
from anomalib_mlff.post_processing.f2pad import F2PAD, Dice, IoU

__all__ = ["MODELS", "MODEL_ARGUMENTS", "FallbackCount", "Row", "engine_for", "evaluator", "fit", "fit_and_measure",
           "measure"]

#: The anomalib models the F2PAD benchmarks refine, by display name.
MODELS: dict[str, type[AnomalibModule]] = {"PatchCore": Patchcore, "PaDiM": Padim}
#: Their settings: resnet18 as in F2PAD's paper, random initialisation (nothing to download).
MODEL_ARGUMENTS: dict[str, dict[str, Any]] = {
    "PatchCore": {"backbone": "resnet18", "pre_trained": False, "layers": ("layer2", "layer3")},
    "PaDiM": {"backbone": "resnet18", "pre_trained": False},
}


class FallbackCount(AnomalibMetric, SumMetric):  # type: ignore[misc]
    """Images whose F2PAD refinement was not trusted (``f2pad_fallback``), summed over the test set."""

    default_fields = ("f2pad_fallback",)


def evaluator() -> Evaluator:
    """IoU/DICE of ``pred_mask`` (the backbone's with F2PAD disabled) and the fallback count."""
    metrics = [metric(fields=["pred_mask", "gt_mask"]) for metric in (IoU, Dice)]
    metrics.append(FallbackCount(fields=["f2pad_fallback"], strict=False))
    return Evaluator(val_metrics=[], test_metrics=metrics)


@dataclass
class Row:
    """One (model, category, protocol) result."""

    model: str
    category: str
    protocol: str
    images: int
    iou_before: float
    iou_after: float
    dice_before: float
    dice_after: float
    seconds_backbone: float
    seconds_f2pad: float
    fallbacks: float
    refines: bool | None = None  # the calibration's verdict, where it ran


def engine_for(out: Path, max_epochs: int = 1) -> Engine:
    """A quiet Engine (no logger, no progress bar) writing under ``out``."""
    return Engine(default_root_dir=out, logger=False, enable_progress_bar=False, max_epochs=max_epochs)


def measure(model: AnomalibModule, engine: Engine, name: str, category: str, roots: dict[str, Path]) -> list[Row]:
    """Validate (threshold) and test each protocol folder of ``roots`` with F2PAD disabled and enabled."""
    rows = []
    for protocol, root in roots.items():
        data = protocol_datamodule(root, category)
        images = count_defective(root, category)
        model.post_processor.enabled = False
        engine.validate(model, datamodule=data, verbose=False)  # this protocol's F1-optimal pixel threshold
        start = time.perf_counter()
        before = engine.test(model, datamodule=data, verbose=False)[0]
        seconds_backbone = (time.perf_counter() - start) / images
        model.post_processor.enabled = True
        start = time.perf_counter()
        after = engine.test(model, datamodule=data, verbose=False)[0]
        seconds_f2pad = (time.perf_counter() - start) / images
        rows.append(Row(name, category, protocol, images, 100 * before["IoU"], 100 * after["IoU"],
                        100 * before["Dice"], 100 * after["Dice"], seconds_backbone, seconds_f2pad,
                        float(after.get("FallbackCount", float("nan")))))
    calibration = getattr(model.post_processor, "calibration", None)
    for row in rows:
        row.refines = None if calibration is None else bool(calibration["refines"])
    return rows


def fit(
    name: str,
    category: str,
    train_root: Path,
    seed: int,
    out: Path,
    f2pad: dict[str, Any] | None = None,
    model_arguments: dict[str, Any] | None = None,
) -> tuple[AnomalibModule, Engine]:
    """Fit ``MODELS[name]`` with ``F2PAD(**f2pad)`` on ``train_root``'s category (seeded).

    The fit ends with F2PAD's calibration where its settings ask for one.

    ``model_arguments`` update :data:`MODEL_ARGUMENTS` (a backbone tag, ``pre_trained=True``).
    """
    if name not in MODELS:
        msg = f"name must be one of {sorted(MODELS)}, got name={name!r}."
        raise ValueError(msg)
    seed_everything(seed, workers=True)
    arguments = {**MODEL_ARGUMENTS[name], **(model_arguments or {})}
    model = MODELS[name](**arguments, post_processor=F2PAD(**(f2pad or {})), evaluator=evaluator())
    engine = engine_for(out / name / category)
    engine.fit(model, datamodule=protocol_datamodule(train_root, category))
    return model, engine


def fit_and_measure(
    name: str,
    category: str,
    roots: dict[str, Path],
    seed: int,
    out: Path,
    f2pad: dict[str, Any] | None = None,
    model_arguments: dict[str, Any] | None = None,
) -> tuple[list[Row], AnomalibModule]:
    """Fit on the first protocol folder of ``roots`` (each holds the same training images), measure every one."""
    model, engine = fit(name, category, next(iter(roots.values())), seed, out, f2pad, model_arguments)
    return measure(model, engine, name, category, roots), model
