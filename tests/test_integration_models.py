"""anomalib's integration checks (fit, train, test, validate, predict, export) for every model of the registry.

The shape follows anomalib's own ``tests/integration/model/test_models.py``, on the plugin's registry: a model
added to :data:`anomalib_mlff.registry.MODELS` is covered with the generic CPU settings below (random-init
resnet18, 64 px, no visualiser), plus its entry in :data:`SIZES` if it needs smaller or compatible ones.
One fit per model is shared by all checks. Beyond anomalib's checks, exported maps must equal torch's at f32.
ONNX and OpenVINO share one trace: the IR is converted from the ONNX file as anomalib's ``to_openvino`` does.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

import openvino as ov
import pytest
import torch
from anomalib.deploy import ExportType, TorchInferencer
from anomalib.models.components import AnomalibModule
from lightning.pytorch import seed_everything

from anomalib_mlff.registry import MODELS
from tests import lightning_helpers as helpers

pytestmark = pytest.mark.slow  # every test here fits a model

#: Per-model settings on top of the generic ones: CPU sizes, and the CaiT that matches resnet18's width.
SIZES: dict[str, dict[str, object]] = {
    "MLFF": {"feature_dim": 16, "tem_levels": 8, "ptfem_levels": 4, "repeat": 1, "epochs": 1, "learning_rate": 0.01},
    "MFFA": {"cait_backbone": "cait_xxs24_224", "n_gaussian_features": 48, "psg_epochs": 1, "learning_rate": 0.01},
}
NAMES = [class_name for _, class_name in MODELS]


def build(name: str) -> AnomalibModule:
    """The registry's model ``name`` at CPU size."""
    module_name = dict((class_name, module) for module, class_name in MODELS)[name]
    model_class = getattr(import_module(module_name), name)
    generic = {
        "backbone": "resnet18",
        "pre_trained": False,
        "visualizer": False,
        "pre_processor": model_class.configure_pre_processor(image_size=(helpers.IMAGE_SIZE, helpers.IMAGE_SIZE)),
    }
    return model_class(**{**generic, **SIZES.get(name, {})})


@pytest.fixture(scope="module", params=NAMES)
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """``engine.train`` (fit, then test) of one model on a small copy of the embedded brick category."""
    root = tmp_path_factory.mktemp(request.param)
    helpers.small_copy(root / "data", n_train=8, n_test=3)
    data = helpers.datamodule(root / "data", "brick", batch_size=8)
    seed_everything(0)
    model = build(request.param)
    engine = helpers.quiet_engine(root / "results")
    results = engine.train(model, datamodule=data)
    return model, engine, data, results[0]


def test_fit(trained) -> None:  # noqa: ANN001
    """Training ran to the model's own epoch count and left a checkpoint."""
    _, engine, _, _ = trained
    assert engine.trainer.current_epoch == engine.trainer.max_epochs
    assert engine.best_model_path and Path(engine.best_model_path).is_file()


def test_train_reports_image_and_pixel_metrics(trained) -> None:  # noqa: ANN001
    *_, results = trained
    for key in ("image_AUROC", "pixel_AUROC"):
        assert 0.0 <= results[key] <= 1.0


def test_test_from_the_checkpoint_repeats_train(trained) -> None:  # noqa: ANN001
    """Testing the saved checkpoint gives train's own test metrics."""
    model, engine, data, results = trained
    again = engine.test(model, datamodule=data, ckpt_path=engine.best_model_path, verbose=False)[0]
    for key, value in results.items():
        assert again[key] == pytest.approx(value, abs=1e-6), key


def test_validate_sets_thresholds(trained) -> None:  # noqa: ANN001
    model, engine, data, _ = trained
    engine.validate(model, datamodule=data, verbose=False)
    assert torch.isfinite(model.post_processor.image_threshold)


def test_predict(trained) -> None:  # noqa: ANN001
    """Every test image gets a full-size map, a mask and a score in [0, 1]."""
    model, engine, data, _ = trained
    batches = engine.predict(model, dataloaders=data.test_dataloader())
    assert sum(len(batch.image) for batch in batches) == len(data.test_data)
    for batch in batches:
        assert batch.anomaly_map.shape[-2:] == (helpers.IMAGE_SIZE, helpers.IMAGE_SIZE)
        assert batch.pred_mask.shape[-2:] == batch.anomaly_map.shape[-2:]
        assert ((batch.pred_score >= 0) & (batch.pred_score <= 1)).all()


def test_export_torch_matches_torch(
    trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    """anomalib's torch export, read back by its ``TorchInferencer``, gives the model's own maps."""
    model, engine, data, _ = trained
    path = engine.export(model, export_type=ExportType.TORCH, export_root=tmp_path)
    assert path is not None and path.is_file()
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib's TorchInferencer unpickles only when told to
    inferencer = TorchInferencer(path=path, device="cpu")
    images = helpers.pick_test_images(data, step=9)
    expected = helpers.predict_maps(model, images)
    for index in range(images.shape[0]):
        exported = inferencer.predict(images[index : index + 1]).anomaly_map
        torch.testing.assert_close(exported.reshape(expected[index].shape), expected[index], rtol=0, atol=1e-5)


def test_export_onnx_and_openvino_match_torch_at_f32(trained, tmp_path: Path) -> None:  # noqa: ANN001
    """anomalib's ONNX export, and the OpenVINO IR converted from it as anomalib's ``to_openvino`` does (one
    trace for both, which is most of an export's time), give the torch maps at f32."""
    model, engine, data, _ = trained
    onnx_path = engine.export(model, export_type=ExportType.ONNX, export_root=tmp_path,
                              onnx_kwargs={"opset_version": 18})
    assert onnx_path is not None and onnx_path.suffix == ".onnx"
    ir_path = tmp_path / "model.xml"
    ov.save_model(ov.convert_model(onnx_path), ir_path, compress_to_fp16=False)
    helpers.assert_exports_match(model, [onnx_path, ir_path], helpers.pick_test_images(data, step=9))
