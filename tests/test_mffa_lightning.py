"""MFFA inside anomalib: both training phases, checkpoints, export, CLI and bad input, on tiny CPU settings."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything
from PIL import Image

from anomalib_mlff.data import EMBEDDED_ROOT
from anomalib_mlff.models.mffa import MFFA
from tests import lightning_helpers as helpers
from tests.conftest import REPO_ROOT, VENV_BIN


def tiny_mffa(**overrides: object) -> MFFA:
    """Random-initialised resnet18 + cait_xxs24_224 MFFA small enough for a unit test."""
    return helpers.tiny_model(MFFA, cait_backbone="cait_xxs24_224", n_gaussian_features=48, psg_epochs=1, **overrides)


class PhaseLog(Callback):
    """Records the epochs run, the PSG loss of each PSG epoch and whether the model was fitted at validation."""

    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.psg_losses: list[float] = []
        self.fitted_at_validation: list[bool] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.epochs.append(trainer.current_epoch)
        if "train_loss_epoch" in trainer.callback_metrics and trainer.current_epoch < pl_module.psg_epochs:
            self.psg_losses.append(float(trainer.callback_metrics["train_loss_epoch"]))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.fitted_at_validation.append(pl_module.model.is_fitted)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[MFFA, Engine, PhaseLog, MVTecAD, dict]:
    seed_everything(0)
    log = PhaseLog()
    model = tiny_mffa()
    initial_backbone = {k: v.clone() for k, v in model.model.feature_extractor.state_dict().items()}
    root = tmp_path_factory.mktemp("mffa")
    engine = helpers.quiet_engine(root, callbacks=[log])
    data = helpers.datamodule()
    engine.fit(model, datamodule=data)
    return model, engine, log, data, initial_backbone


def test_psg_epochs_then_one_fill_epoch_before_validation(trained) -> None:  # noqa: ANN001
    model, engine, log, _, initial_backbone = trained
    assert engine.trainer.max_epochs == 2  # psg_epochs + the fill epoch, set by the model
    assert log.epochs == [0, 1]
    assert len(log.psg_losses) == 1 and np.isfinite(log.psg_losses[0])
    assert log.fitted_at_validation == [True]
    assert model.model.is_fitted
    assert float(engine.trainer.callback_metrics["fill_images"]) == 60
    backbone = model.model.feature_extractor.state_dict()
    changed = [key for key, value in backbone.items() if not torch.equal(value, initial_backbone[key])]
    assert any(k.endswith("weight") and "conv" in k for k in changed), "PSG did not fine-tune the backbone"
    # coreset of 1% of 60 images x 8 x 8 layer2 positions; Gaussians on the 16 x 16 layer1 grid
    assert model.model.gaussian.grid_positions == 16 * 16
    assert model.model.gaussian.gaussian.inv_covariance.shape == (256, 48, 48)


def test_test_metrics_are_reported(trained) -> None:  # noqa: ANN001
    model, engine, _, data, _ = trained
    metrics = engine.test(model, datamodule=data, verbose=False)[0]
    for key in ("image_AUROC", "pixel_AUROC"):
        assert 0.0 <= metrics[key] <= 1.0


def test_checkpoint_round_trip_gives_identical_maps(trained, tmp_path: Path) -> None:  # noqa: ANN001
    model, engine, _, data, _ = trained
    images = helpers.pick_test_images(data, count=4)
    restored = helpers.checkpoint_round_trip(model, engine, tmp_path / "mffa.ckpt", images)
    assert restored.model.is_fitted
    for key in ("lgffp.deep_channel_index", "gaussian.feature_index"):
        assert torch.equal(restored.model.state_dict()[key], model.model.state_dict()[key])


def test_onnx_and_openvino_exports_match_torch_at_f32(trained, tmp_path: Path) -> None:  # noqa: ANN001
    """The exported ONNX file, and the OpenVINO IR converted from it (as ``to_openvino`` does), give the torch maps."""
    model, engine, _, data, _ = trained
    onnx_path = engine.export(model, export_type="onnx", export_root=tmp_path)
    assert onnx_path.suffix == ".onnx"
    ir_path = tmp_path / "model.xml"
    ov.save_model(ov.convert_model(onnx_path), ir_path, compress_to_fp16=False)
    helpers.assert_exports_match(model, [onnx_path, ir_path], helpers.pick_test_images(data, step=9))


def test_single_training_image_is_a_clear_error(tmp_path: Path) -> None:
    folder = helpers.small_copy(tmp_path, n_train=1)
    with pytest.raises(ValueError, match=r"category=brick.*1 image.*at least 2"):
        helpers.quiet_engine(tmp_path).fit(tiny_mffa(), datamodule=helpers.datamodule(folder.parent, "brick"))


def test_empty_training_folder_names_the_dataset(tmp_path: Path) -> None:
    folder = helpers.small_copy(tmp_path, n_train=0)
    with pytest.raises(ValueError, match=r"category=brick.*0 image"):
        helpers.quiet_engine(tmp_path).fit(tiny_mffa(), datamodule=helpers.datamodule(folder.parent, "brick"))


def test_unknown_argument_names_both_classes() -> None:
    with pytest.raises(TypeError, match=r"bakbone.*MFFA or MFFAModel"):
        tiny_mffa(bakbone="resnet18")


def test_rgba_grayscale_and_odd_sized_images_fit_in_one_pass(tmp_path: Path) -> None:
    """Without PSG, training is one pass (like PaDiM); anomalib's reader and resize handle odd images."""
    folder = helpers.small_copy(tmp_path, n_train=4)
    gray = Image.open(next((folder / "train" / "good").glob("*.png")))
    assert gray.mode == "L"
    rgba = gray.resize((100, 77)).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "train" / "good" / "rgba.png")
    model = tiny_mffa(use_psg=False)
    engine = helpers.quiet_engine(tmp_path)
    engine.fit(model, datamodule=helpers.datamodule(folder.parent, "brick"))
    assert engine.trainer.max_epochs == 1
    assert model.model.is_fitted and model.model.psg_head is None


def test_cli_trains_the_short_name_with_the_cpu_config(tmp_path: Path) -> None:
    """`anomalib train --model MFFA` resolves the plugin's class; the shipped CPU config trains (shortened)."""
    anomalib = str(VENV_BIN / "anomalib")
    config = str(REPO_ROOT / "configs" / "mffa_cpu.yaml")
    train = subprocess.run(  # noqa: S603
        [anomalib, "train", "--config", config, "--model", "MFFA", "--model.psg_epochs", "1",
         "--model.use_lgffp", "false", "--data.root", str(EMBEDDED_ROOT), "--default_root_dir", str(tmp_path),
         "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
         "--model.visualizer", "false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )
    assert train.returncode == 0, train.stderr[-4000:]
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    restored = MFFA.load_from_checkpoint(checkpoint)
    assert restored.model.is_fitted
    assert restored.model.lgffp is None and restored.model.gaussian.feature_index.numel() == 100
    assert restored.model.feature_extractor.backbone == "resnet18"
