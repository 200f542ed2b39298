"""Main job: train, test and export MLFF on the embedded data, then check the export.

``python -m anomalib_mlff.demo`` trains a CPU-sized MLFF (random-initialised resnet18, 128 px)
with anomalib's ``Engine`` on the embedded "brick" category, tests it (metrics and
visualisations written by anomalib under ``--output``), exports it to OpenVINO and compares
the exported model's anomaly maps with the torch model's at f32. It shows Lightning's progress bars,
writes ``<output>/predictions.png`` (test images with their ground truth, anomaly maps and predicted
masks) and ``<output>/summary.json``, and prints where each output is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from anomalib.data import PredictDataset
from anomalib.engine import Engine
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from lightning.pytorch import seed_everything

from anomalib_mlff.data import EMBEDDED_CATEGORIES, EMBEDDED_ROOT, embedded_datamodule
from anomalib_mlff.deploy import openvino_inferencer
from anomalib_mlff.figures import prediction_grid
from anomalib_mlff.models.mlff import MLFF


def demo_evaluator() -> Evaluator:
    """Image AUROC/F1, pixel AUROC/F1 and PRO (anomalib's AUPRO)."""
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ],
    )


def demo_model(image_size: int = 128, repeat: int = 2, epochs: int = 6) -> MLFF:
    """MLFF sized for a 2-core CPU: resnet18 without ImageNet weights, fewer TEM levels."""
    return MLFF(
        backbone="resnet18",
        pre_trained=False,
        feature_dim=128,
        tem_levels=32,
        repeat=repeat,
        epochs=epochs,
        learning_rate=0.01,
        pre_processor=MLFF.configure_pre_processor(image_size=(image_size, image_size)),
        evaluator=demo_evaluator(),
    )


def export_parity(model: MLFF, export_path: Path, category: str) -> float:
    """Largest |OpenVINO(f32) - torch| anomaly-map difference over the category's defect images."""
    inferencer = openvino_inferencer(export_path)
    dataset = PredictDataset(path=EMBEDDED_ROOT / category / "test" / "scratch")
    model.eval()
    worst = 0.0
    for item in dataset:
        with torch.no_grad():
            expected = model(item.image.unsqueeze(0)).anomaly_map
        exported = inferencer.predict(item.image.unsqueeze(0)).anomaly_map
        worst = max(worst, float(np.abs(np.asarray(exported) - expected.numpy()).max()))
    return worst


def prediction_figure(engine: Engine, model: MLFF, datamodule: object, path: Path, per_type: int = 2) -> Path:
    """``per_type`` test images of each kind (good and every defect), with maps and masks, in one PNG."""
    batches = engine.predict(model, dataloaders=datamodule.test_dataloader())
    chosen: dict[str, list[tuple]] = {}
    for batch in batches:
        for index, image_path in enumerate(batch.image_path):
            kind = Path(image_path).parent.name
            if len(chosen.setdefault(kind, [])) < per_type:
                chosen[kind].append((batch, index, f"{kind} {Path(image_path).stem}"))
    picks = [pick for kind in sorted(chosen, key=lambda k: (k != "good", k)) for pick in chosen[kind]]
    return prediction_grid(
        images=[batch.image[i] for batch, i, _ in picks],
        anomaly_maps=[batch.anomaly_map[i] for batch, i, _ in picks],
        pred_masks=[batch.pred_mask[i].float() for batch, i, _ in picks],
        gt_masks=[batch.gt_mask[i].float() for batch, i, _ in picks],
        titles=[title for _, _, title in picks],
        path=path,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", default="brick", choices=EMBEDDED_CATEGORIES)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--output", type=Path, default=Path("results/mlff_demo"))
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    seed_everything(args.seed, workers=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    datamodule = embedded_datamodule(args.category, train_batch_size=16, eval_batch_size=16)
    model = demo_model(args.image_size, epochs=args.epochs)
    engine = Engine(default_root_dir=args.output, logger=False)  # Lightning's progress bars stay on
    engine.fit(model, datamodule=datamodule)
    metrics = engine.test(model, datamodule=datamodule)[0]
    # torch's ONNX exporter writes opset 18; anomalib's default request for 14 only triggers a down-conversion
    # that fails (printing a traceback) and keeps opset 18, so ask for 18 directly.
    export_path = engine.export(
        model, export_type="openvino", export_root=args.output / "export", onnx_kwargs={"opset_version": 18}
    )
    difference = export_parity(model, export_path, args.category)
    figure = prediction_figure(engine, model, datamodule, args.output / "predictions.png")
    visualisations = next((p for p in sorted(args.output.rglob("images")) if p.is_dir()), args.output)
    summary = {
        "category": args.category,
        "epochs": args.epochs,
        "metrics": {k: round(float(v), 4) for k, v in metrics.items()},
        "openvino_f32_max_abs_map_difference": difference,
        "export": str(export_path),
        "visualisations": str(visualisations),
        "figure": str(figure),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    summary_path = args.output / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"\nanomalib's visualisations: {visualisations}\nfigure (images, ground truth, maps, masks): {figure}"
          f"\nOpenVINO export: {export_path}\nsummary: {summary_path}")


if __name__ == "__main__":
    main()
