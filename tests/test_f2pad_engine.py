"""F2PAD inside anomalib: Engine fit/test/predict, Evaluator metrics, figures, checkpoint, export, YAML."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.cli import AnomalibCLI
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.metrics import Evaluator
from anomalib.models import Patchcore
from anomalib.post_processing import PostProcessor
from lightning.pytorch import seed_everything
from PIL import Image

from anomalib_mlff import F2PAD, Dice, IoU
from anomalib_mlff.data import EMBEDDED_ROOT
from anomalib_mlff.deploy import openvino_inferencer

pytestmark = pytest.mark.slow  # every test here fits a model

SIZE = 64
SMALL = {"dilation": 3, "crop_margin": 16, "reach": 8, "max_iterations": 15, "reestimation_iterations": 5}


def small_dataset(root: Path) -> Path:
    """20 training images, 2 good and 6 defective test images of the embedded brick data, at 64 px."""
    source = EMBEDDED_ROOT / "brick"
    picks = {
        "train/good": sorted((source / "train/good").glob("*.png"))[:20],
        "test/good": sorted((source / "test/good").glob("*.png"))[:2],
        **{
            f"test/{kind}": sorted((source / f"test/{kind}").glob("*.png"))[:2]
            for kind in ("hole", "scratch", "stain")
        },
    }
    for folder, paths in picks.items():
        (root / "brick" / folder).mkdir(parents=True)
        for path in paths:
            Image.open(path).resize((SIZE, SIZE), Image.BILINEAR).save(root / "brick" / folder / path.name)
            if folder != "test/good":
                mask = source / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
                if mask.exists():
                    (root / "brick" / "ground_truth" / path.parent.name).mkdir(parents=True, exist_ok=True)
                    Image.open(mask).resize((SIZE, SIZE), Image.NEAREST).save(
                        root / "brick" / "ground_truth" / path.parent.name / mask.name
                    )
    return root


def tiny_patchcore(post_processor: F2PAD | PostProcessor, evaluator: Evaluator | bool = False) -> Patchcore:
    return Patchcore(
        backbone="resnet18",
        layers=("layer2", "layer3"),
        pre_trained=False,
        pre_processor=Patchcore.configure_pre_processor(image_size=(SIZE, SIZE)),
        post_processor=post_processor,
        evaluator=evaluator,
        visualizer=False,
    )


def mask_metrics() -> Evaluator:
    metrics = [
        metric(fields=[field, "gt_mask"], prefix=prefix)
        for field, prefix in (("initial_mask", "backbone_"), ("pred_mask", "f2pad_"))
        for metric in (IoU, Dice)
    ]
    return Evaluator(val_metrics=[], test_metrics=metrics)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Patchcore, Engine, MVTecAD, Path]:
    seed_everything(0)
    root = tmp_path_factory.mktemp("f2pad")
    data = MVTecAD(
        root=small_dataset(root / "data"), category="brick", train_batch_size=8, eval_batch_size=4, num_workers=0
    )
    model = tiny_patchcore(F2PAD(**SMALL, calibration_images=4, visualization_dir=root / "figures"), mask_metrics())
    engine = Engine(default_root_dir=root / "results", logger=False, enable_progress_bar=False, max_epochs=1)
    engine.fit(model, datamodule=data)
    return model, engine, data, root


def test_training_fits_the_prior_and_records_the_input_size(fitted) -> None:  # noqa: ANN001
    model, _, _, _ = fitted
    assert model.post_processor.pixel_prior.is_fitted
    assert model.post_processor.model_input_size == (SIZE, SIZE)
    assert not torch.isnan(model.post_processor.pixel_threshold)


def test_test_reports_mask_metrics_before_and_after(fitted) -> None:  # noqa: ANN001
    model, engine, data, root = fitted
    metrics = engine.test(model, datamodule=data, verbose=False)[0]
    for key in ("backbone_IoU", "backbone_Dice", "f2pad_IoU", "f2pad_Dice"):
        assert 0.0 <= metrics[key] <= 1.0, key
    figures = sorted((root / "figures").glob("*.png"))
    assert len(figures) == 8
    # image, recovered image, F2PAD mask and ground truth side by side
    assert Image.open(figures[0]).size == (4 * SIZE, SIZE)


def test_predict_returns_refined_masks_maps_and_normal_images(fitted) -> None:  # noqa: ANN001
    model, engine, data, _ = fitted
    batches = engine.predict(model, dataloaders=data.test_dataloader())
    batch = batches[-1]
    assert batch.pred_mask.dtype == torch.bool and batch.pred_mask.shape == (4, SIZE, SIZE)
    assert batch.initial_mask.shape == (4, SIZE, SIZE)
    assert batch.normal_image.shape == (4, 3, SIZE, SIZE)
    assert 0 <= batch.normal_image.min() and batch.normal_image.max() <= 1
    assert 0 <= batch.anomaly_map.min() and batch.anomaly_map.max() < 1
    torch.testing.assert_close(batch.pred_mask, batch.anomaly_map.reshape(batch.pred_mask.shape) > 0.5)
    # pixels F2PAD marks lie in the dilated initial mask
    grown = torch.nn.functional.max_pool2d(batch.initial_mask[:, None].float(), 7, 1, 3)[:, 0] > 0
    assert not (batch.pred_mask & ~grown).any()
    assert any(b.initial_mask.any() for b in batches)


def test_checkpoint_keeps_the_prior_and_input_size(fitted, tmp_path: Path) -> None:  # noqa: ANN001
    model, engine, _, _ = fitted
    path = tmp_path / "model.ckpt"
    engine.trainer.save_checkpoint(path)
    restored = Patchcore.load_from_checkpoint(path, post_processor=F2PAD())
    torch.testing.assert_close(restored.post_processor.pixel_prior.means, model.post_processor.pixel_prior.means)
    assert restored.post_processor.model_input_size == (SIZE, SIZE)
    assert restored.post_processor.dilation == SMALL["dilation"]
    # what `anomalib export --ckpt_path` does: rebuild with the default post-processor
    plain = Patchcore.load_from_checkpoint(path)
    assert type(plain.post_processor) is PostProcessor
    torch.testing.assert_close(plain.post_processor.pixel_threshold, model.post_processor.pixel_threshold)


def test_training_calibrates_the_weights_and_the_checkpoint_keeps_them(fitted, tmp_path: Path) -> None:  # noqa: ANN001
    model, engine, _, _ = fitted
    calibration = model.post_processor.calibration
    assert calibration is not None and len(calibration["trials"]) >= 6
    for name, value in calibration["weights"].items():
        assert getattr(model.post_processor, name) == value
    path = tmp_path / "model.ckpt"
    engine.trainer.save_checkpoint(path)
    restored = Patchcore.load_from_checkpoint(path, post_processor=F2PAD())
    assert restored.post_processor.calibration == calibration
    for name, value in calibration["weights"].items():
        assert getattr(restored.post_processor, name) == value


def test_setup_names_a_model_whose_map_has_no_gradient(tmp_path: Path) -> None:
    from anomalib.models import Dfm  # noqa: PLC0415 - its forward runs the backbone under torch.no_grad

    model = Dfm(backbone="resnet18", pre_trained=False, post_processor=F2PAD())
    data = MVTecAD(root=EMBEDDED_ROOT, category="brick", num_workers=0)
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, max_epochs=1)
    engine.fit(model, datamodule=data)
    with pytest.raises(TypeError, match="F2PAD cannot refine DFMModel: no gradient reaches the pixels"):
        engine.test(model, datamodule=data)


def test_yaml_config_and_anomalib_export_of_a_model_with_f2pad(fitted, tmp_path: Path) -> None:  # noqa: ANN001
    """The YAML form builds F2PAD; `anomalib export` of its checkpoint gives plain post-processing."""
    model, engine, data, root = fitted
    checkpoint = tmp_path / "model.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    config = tmp_path / "f2pad.yaml"
    config.write_text(
        f"""
model:
  class_path: anomalib.models.Patchcore
  init_args:
    backbone: resnet18
    layers: [layer2, layer3]
    pre_trained: false
    post_processor:
      class_path: anomalib_mlff.F2PAD
      init_args: {{dilation: 3, max_iterations: 15, inpainter: ns}}
data:
  class_path: anomalib.data.MVTecAD
  init_args: {{root: {root / "data"}, category: brick, num_workers: 0}}
"""
    )
    arguments = ["export", "--config", str(config), "--export_type", "openvino", "--ckpt_path", str(checkpoint)]
    cli = AnomalibCLI([*arguments, "--default_root_dir", str(tmp_path)], run=False)
    assert isinstance(cli.model.post_processor, F2PAD)
    assert cli.model.post_processor.dilation == 3 and cli.model.post_processor.inpainter.method == "ns"
    cli._run_subcommand()  # noqa: SLF001 - what the `anomalib export` command runs
    exported = next(tmp_path.rglob("model.xml"))
    image = data.test_data[3].image[None]
    model.eval()
    with torch.no_grad():
        expected = model(image)  # forward(): plain PostProcessor normalisation and thresholding
    result = openvino_inferencer(exported).predict(image)
    np.testing.assert_allclose(np.asarray(result.anomaly_map), expected.anomaly_map.numpy(), atol=1e-4)
