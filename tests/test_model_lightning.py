"""MLFF and MFFA inside anomalib: training (both of MFFA's phases), checkpoints, export, CLI and bad input, on
tiny CPU settings."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule
from lightning.pytorch import Callback, seed_everything
from PIL import Image

from anomalib_mlff.data import EMBEDDED_ROOT
from anomalib_mlff.models.mffa import MFFA
from anomalib_mlff.models.mlff import MLFF
from tests import lightning_helpers as helpers
from tests.conftest import REPO_ROOT, VENV_BIN


def tiny_mlff(**overrides: object) -> MLFF:
    """Random-initialised resnet18 MLFF small enough for a unit test."""
    return helpers.tiny_model(MLFF, **{"feature_dim": 32, "tem_levels": 8, "ptfem_levels": 4, "repeat": 1, "epochs": 1,
                                        **overrides})


def tiny_mffa(**overrides: object) -> MFFA:
    """Random-initialised resnet18 + cait_xxs24_224 MFFA small enough for a unit test."""
    return helpers.tiny_model(MFFA, cait_backbone="cait_xxs24_224", n_gaussian_features=48, psg_epochs=1, **overrides)


TINY: dict[str, Callable[..., AnomalibModule]] = {"mlff": tiny_mlff, "mffa": tiny_mffa}


class LossHistory(Callback):
    """Collects the mean training loss of every epoch."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.losses.append(float(trainer.callback_metrics["train_loss_epoch"]))


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


@dataclass
class Trained:
    """A model fitted on the embedded brick data, with its engine, datamodule and training log."""

    name: str
    model: AnomalibModule
    engine: Engine
    data: MVTecAD
    log: Callback
    initial_backbone: dict[str, torch.Tensor] | None = None  # the backbone's weights before training


@pytest.fixture(scope="module")
def trained_mlff(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    seed_everything(0)
    history = LossHistory()
    model = tiny_mlff(epochs=4)
    engine = helpers.quiet_engine(tmp_path_factory.mktemp("mlff"), callbacks=[history])
    data = helpers.datamodule()
    engine.fit(model, datamodule=data)
    return Trained("mlff", model, engine, data, history)


@pytest.fixture(scope="module")
def trained_mffa(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    seed_everything(0)
    log = PhaseLog()
    model = tiny_mffa()
    initial_backbone = {k: v.clone() for k, v in model.model.feature_extractor.state_dict().items()}
    engine = helpers.quiet_engine(tmp_path_factory.mktemp("mffa"), callbacks=[log])
    data = helpers.datamodule()
    engine.fit(model, datamodule=data)
    return Trained("mffa", model, engine, data, log, initial_backbone)


@pytest.fixture(params=list(TINY))
def trained(request: pytest.FixtureRequest) -> Trained:
    """Each model, trained once per module."""
    return request.getfixturevalue(f"trained_{request.param}")


def add_rgba_image(folder: Path, size: tuple[int, int] | None = None) -> None:
    """Adds a half-transparent RGBA copy (resized to ``size``) of the first grayscale training image of ``folder``."""
    gray = Image.open(next((folder / "train" / "good").glob("*.png")))
    assert gray.mode == "L"
    rgba = (gray.resize(size) if size else gray).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "train" / "good" / "rgba.png")


def mlff_restored_records_all_its_arguments(restored: MLFF, model: MLFF) -> None:  # noqa: ARG001
    assert restored.hparams["feature_dim"] == 32 and restored.hparams["use_stl"] is True


def mffa_restored_keeps_its_fit(restored: MFFA, model: MFFA) -> None:
    assert restored.model.is_fitted
    for key in ("lgffp.deep_channel_index", "gaussian.feature_index"):
        assert torch.equal(restored.model.state_dict()[key], model.model.state_dict()[key])


RESTORED_CHECKS: dict[str, Callable[[AnomalibModule, AnomalibModule], None]] = {
    "mlff": mlff_restored_records_all_its_arguments,
    "mffa": mffa_restored_keeps_its_fit,
}


def export_openvino(model: AnomalibModule, engine: Engine, root: Path) -> list[Path]:
    """anomalib's OpenVINO export."""
    return [engine.export(model, export_type="openvino", export_root=root)]


def export_onnx_then_openvino(model: AnomalibModule, engine: Engine, root: Path) -> list[Path]:
    """The exported ONNX file, and the OpenVINO IR converted from it (as ``to_openvino`` does)."""
    onnx_path = engine.export(model, export_type="onnx", export_root=root)
    assert onnx_path.suffix == ".onnx"
    ir_path = root / "model.xml"
    ov.save_model(ov.convert_model(onnx_path), ir_path, compress_to_fp16=False)
    return [onnx_path, ir_path]


EXPORTS: dict[str, Callable[[AnomalibModule, Engine, Path], list[Path]]] = {
    "mlff": export_openvino,
    "mffa": export_onnx_then_openvino,
}


@pytest.mark.slow
def test_mlff_training_lowers_the_loss(trained_mlff: Trained) -> None:
    losses = trained_mlff.log.losses
    assert len(losses) == 4
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_mlff_sets_the_engine_epochs_and_decays_the_learning_rate(trained_mlff: Trained) -> None:
    """``epochs`` reaches the Engine (no max_epochs was passed to it); lr x ``lr_decay`` after each epoch."""
    model, engine = trained_mlff.model, trained_mlff.engine
    assert engine.trainer.max_epochs == model.epochs == 4
    assert engine.trainer.current_epoch == 4
    expected = model.learning_rate * model.lr_decay**4
    assert model.optimizers().param_groups[0]["lr"] == pytest.approx(expected)
    assert helpers.tiny_model(MLFF).default_max_epochs == 200  # the paper's, by default


@pytest.mark.slow
def test_mffa_psg_epochs_then_one_fill_epoch_before_validation(trained_mffa: Trained) -> None:
    model, engine, log = trained_mffa.model, trained_mffa.engine, trained_mffa.log
    assert engine.trainer.max_epochs == 2  # psg_epochs + the fill epoch, set by the model
    assert log.epochs == [0, 1]
    assert len(log.psg_losses) == 1 and np.isfinite(log.psg_losses[0])
    assert log.fitted_at_validation == [True]
    assert model.model.is_fitted
    assert float(engine.trainer.callback_metrics["fill_images"]) == 60
    backbone = model.model.feature_extractor.state_dict()
    changed = [key for key, value in backbone.items() if not torch.equal(value, trained_mffa.initial_backbone[key])]
    assert any(k.endswith("weight") and "conv" in k for k in changed), "PSG did not fine-tune the backbone"
    # coreset of 1% of 60 images x 8 x 8 layer2 positions; Gaussians on the 16 x 16 layer1 grid
    assert model.model.gaussian.grid_positions == 16 * 16
    assert model.model.gaussian.gaussian.inv_covariance.shape == (256, 48, 48)


@pytest.mark.slow
def test_test_metrics_are_reported(trained: Trained) -> None:
    metrics = trained.engine.test(trained.model, datamodule=trained.data, verbose=False)[0]
    for key in ("image_AUROC", "pixel_AUROC"):
        assert 0.0 <= metrics[key] <= 1.0


@pytest.mark.slow
def test_checkpoint_round_trip_gives_identical_maps(trained: Trained, tmp_path: Path) -> None:
    images = helpers.pick_test_images(trained.data, count=4)
    path = tmp_path / f"{trained.name}.ckpt"
    restored = helpers.checkpoint_round_trip(trained.model, trained.engine, path, images)
    RESTORED_CHECKS[trained.name](restored, trained.model)


@pytest.mark.slow
def test_exports_match_torch_at_f32(trained: Trained, tmp_path: Path) -> None:
    paths = EXPORTS[trained.name](trained.model, trained.engine, tmp_path)
    helpers.assert_exports_match(trained.model, paths, helpers.pick_test_images(trained.data, step=9))


@pytest.mark.parametrize("name", TINY)
def test_empty_training_folder_names_the_dataset(name: str, tmp_path: Path) -> None:
    folder = helpers.small_copy(tmp_path, n_train=0)
    with pytest.raises(ValueError, match=r"category=brick.*0 image"):
        helpers.quiet_engine(tmp_path).fit(TINY[name](), datamodule=helpers.datamodule(folder.parent, "brick"))


def test_mlff_corrupt_training_image_is_named(tmp_path: Path) -> None:
    folder = helpers.small_copy(tmp_path, n_train=6)
    (folder / "train" / "good" / "broken.png").write_bytes(b"not a png")
    engine = helpers.quiet_engine(tmp_path)
    with pytest.raises(Exception, match="broken.png"):
        engine.fit(tiny_mlff(), datamodule=helpers.datamodule(tmp_path, "brick"))


def test_mffa_single_training_image_is_a_clear_error(tmp_path: Path) -> None:
    folder = helpers.small_copy(tmp_path, n_train=1)
    with pytest.raises(ValueError, match=r"category=brick.*1 image.*at least 2"):
        helpers.quiet_engine(tmp_path).fit(tiny_mffa(), datamodule=helpers.datamodule(folder.parent, "brick"))


def test_mffa_unknown_argument_names_both_classes() -> None:
    with pytest.raises(TypeError, match=r"bakbone.*MFFA or MFFAModel"):
        tiny_mffa(bakbone="resnet18")


def test_mlff_nan_images_raise_a_clear_error() -> None:
    model = tiny_mlff()
    model.eval()
    images = torch.zeros(1, 3, helpers.IMAGE_SIZE, helpers.IMAGE_SIZE)
    images[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="(?i)nan"):
        model.model(images)


@pytest.mark.slow
def test_mlff_rgba_and_grayscale_images_train(tmp_path: Path) -> None:
    folder = helpers.small_copy(tmp_path, n_train=6)
    add_rgba_image(folder)
    engine = helpers.quiet_engine(tmp_path)
    model = tiny_mlff()
    engine.fit(model, datamodule=helpers.datamodule(tmp_path, "brick"))
    assert torch.isfinite(torch.tensor(float(engine.trainer.callback_metrics["train_loss_epoch"])))


@pytest.mark.slow
def test_mffa_rgba_grayscale_and_odd_sized_images_fit_in_one_pass(tmp_path: Path) -> None:
    """Without PSG, training is one pass (like PaDiM); anomalib's reader and resize handle odd images."""
    folder = helpers.small_copy(tmp_path, n_train=4)
    add_rgba_image(folder, size=(100, 77))
    model = tiny_mffa(use_psg=False)
    engine = helpers.quiet_engine(tmp_path)
    engine.fit(model, datamodule=helpers.datamodule(folder.parent, "brick"))
    assert engine.trainer.max_epochs == 1
    assert model.model.is_fitted and model.model.psg_head is None


@pytest.mark.slow
def test_mlff_cli_train_and_export_with_the_cpu_config(tmp_path: Path) -> None:
    """`anomalib train` on the shipped config (shortened), then `anomalib export` of its checkpoint."""
    anomalib = str(VENV_BIN / "anomalib")
    config = str(REPO_ROOT / "configs" / "mlff_cpu.yaml")
    common = ["--config", config, "--data.root", str(EMBEDDED_ROOT), "--default_root_dir", str(tmp_path)]
    train = subprocess.run(  # noqa: S603
        [anomalib, "train", *common, "--model.epochs", "1", "--model.repeat", "1",
         "--trainer.limit_train_batches", "1", "--trainer.limit_test_batches", "1", "--model.visualizer", "false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )
    assert train.returncode == 0, train.stderr[-4000:]
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints, train.stdout[-2000:]
    export = subprocess.run(  # noqa: S603
        [anomalib, "export", "--model", "MLFF", "--model.backbone", "resnet18", "--model.pre_trained", "false",
         "--model.feature_dim", "128", "--model.tem_levels", "32", "--export_type", "openvino",
         "--ckpt_path", str(checkpoints[0]), "--default_root_dir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )
    assert export.returncode == 0, export.stderr[-4000:]
    assert list(tmp_path.rglob("model.xml")), export.stdout[-2000:]


@pytest.mark.slow
def test_mffa_cli_trains_the_short_name_with_the_cpu_config(tmp_path: Path) -> None:
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
