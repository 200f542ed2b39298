"""Which anomalib image models F2PAD refines, and how well: bench_f2pad.py's two protocols, one run.

Every model is anomalib's own, built offline (``pre_trained=False`` where it has the argument) at
``--image-size`` with F2PAD as its post-processor at F2PAD's defaults, fitted on the embedded category's 60
normal images, then measured as in bench_f2pad.py (:mod:`anomalib_mlff.evaluation.measure`): each protocol's
F1-optimal pixel threshold, the test set with F2PAD off (the backbone's mask) and on. A model that cannot be
built offline or that F2PAD refuses at setup is listed with the reason it gave. Which scorer F2PAD used is
printed beside each model: a registered one (PatchCore, PaDiM, CFLOW) or the generic one, the model's own
forward differentiated (``AnomalyMapScorer``).

    python benchmarks/f2pad_coverage.py                      # every model, both categories, 128 px
    python benchmarks/f2pad_coverage.py --models Fastflow Dfm --categories brick --paper-images 1 \\
        --real-images 1 --material-images 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import anomalib.models
import torch
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_mlff import F2PAD
from anomalib_mlff.data import EMBEDDED_ROOT
from anomalib_mlff.components.normalization import PixelRange
from anomalib_mlff.evaluation.measure import evaluator, measure
from anomalib_mlff.evaluation.protocols import build_paper, build_realistic, protocol_datamodule
from anomalib_mlff.post_processing.f2pad.scorers import MissingScorerError, build_scorer

RESNET = {"backbone": "resnet18", "pre_trained": False}
#: model class name in anomalib.models -> (constructor arguments, training epochs); a category's own images
#: are never DRAEM's anomaly source (DTD is a download): the other embedded category's are.
MODELS: dict[str, tuple[dict[str, Any], int]] = {
    "Patchcore": ({**RESNET, "layers": ("layer2", "layer3")}, 1),
    "Padim": (RESNET, 1),
    "Cflow": ({**RESNET, "layers": ("layer1", "layer2", "layer3")}, 3),
    "Fastflow": ({**RESNET, "flow_steps": 4}, 4),
    "ReverseDistillation": (RESNET, 6),
    "Draem": ({}, 2),
    "Dfm": (RESNET, 1),
    "Dfkde": (RESNET, 1),
    "Stfpm": ({"backbone": "resnet18"}, 4),
    "Supersimplenet": ({}, 2),
    "EfficientAd": ({}, 2),
}
OTHER_CATEGORY = {"brick": "grass", "grass": "brick"}


def build(name: str, category: str, image_size: int) -> anomalib.models.AnomalibModule:
    """The anomalib model with F2PAD and the benchmark's metrics, at ``image_size``."""
    arguments, _ = MODELS[name]
    if name == "Draem":
        arguments = {"dtd_dir": str(EMBEDDED_ROOT / OTHER_CATEGORY[category] / "train" / "good")}
    model_class = getattr(anomalib.models, name)
    pre_processor = model_class.configure_pre_processor(image_size=(image_size, image_size))
    return model_class(**arguments, pre_processor=pre_processor, post_processor=F2PAD(), evaluator=evaluator())


def cover(name: str, category: str, roots: dict[str, Path], image_size: int, seed: int, out: Path) -> list[str]:
    """One model on one category: table lines, or one line with the reason it is not refined."""
    seed_everything(seed, workers=True)
    start = time.perf_counter()
    try:
        model = build(name, category, image_size)
    except Exception as error:  # noqa: BLE001 - any failure to build offline is reported as the reason
        return [f"| {name} | {category} | - | no: cannot be built offline ({type(error).__name__}: "
                f"{_short(error)}) | | | | | | |"]
    engine = Engine(default_root_dir=out / name / category, logger=False, enable_progress_bar=False,
                    max_epochs=MODELS[name][1], num_sanity_val_steps=0)
    try:
        engine.fit(model, datamodule=protocol_datamodule(roots["paper"], category))
        fit_seconds = time.perf_counter() - start
        scorer = build_scorer(model.model, PixelRange.of_model(model), 10)
        scorer.check_differentiable((image_size, image_size))  # what F2PAD's setup checks before testing
    except MissingScorerError as error:
        return [f"| {name} | {category} | - | no: {_short(error)} | | | | | | |"]
    except Exception as error:  # noqa: BLE001 - e.g. EfficientAd: batch size 1 and downloads at train start
        return [f"| {name} | {category} | - | not measured: fit failed ({type(error).__name__}: {_short(error)}) "
                "| | | | | | |"]
    rows = measure(model, engine, name, category, roots)
    return [
        f"| {name} | {category} | {type(scorer).__name__} | yes | {row.protocol} "
        f"| {row.iou_before:.1f} -> {row.iou_after:.1f} "
        f"| {row.dice_before:.1f} -> {row.dice_after:.1f} | {row.seconds_backbone:.2f} | {row.seconds_f2pad:.2f} "
        f"| {fit_seconds:.0f} |"
        for row in rows
    ]


def _short(error: Exception) -> str:
    return " ".join(str(error).split())[:220].replace("|", "/")


def main() -> None:
    """Build both protocols per category, then fit and measure every model on them."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--categories", nargs="+", default=["brick", "grass"])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--paper-images", type=int, default=2, help="cut-paste images per category")
    parser.add_argument("--real-images", type=int, default=2, help="embedded defect images per category")
    parser.add_argument("--material-images", type=int, default=2, help="material defect images per category")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}, "
          f"{args.image_size} px")
    print("| model | category | scorer | refines | protocol | IoU before -> after | DICE before -> after "
          "| s/img backbone | s/img F2PAD | fit s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for category in args.categories:
            roots = {"paper": out / category / "paper", "realistic": out / category / "realistic"}
            build_paper(roots["paper"], category, args.paper_images, args.seed)
            build_realistic(roots["realistic"], category, args.real_images, args.material_images, args.seed)
            for name in args.models:
                for line in cover(name, category, roots, args.image_size, args.seed, out / "results"):
                    print(line, flush=True)


if __name__ == "__main__":
    main()
