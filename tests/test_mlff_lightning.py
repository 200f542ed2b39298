"""MLFF inside anomalib: training, checkpoints, export, CLI and bad input, on tiny CPU settings."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything
from PIL import Image

from anomalib_mlff.data import EMBEDDED_ROOT
from anomalib_mlff.models.mlff import MLFF
from tests import lightning_helpers as helpers
from tests.conftest import REPO_ROOT, VENV_BIN


def tiny_mlff(**overrides: object) -> MLFF:
    """Random-initialised resnet18 MLFF small enough for a unit test."""
    return helpers.tiny_model(MLFF, **{"feature_dim": 32, "tem_levels": 8, "ptfem_levels": 4, "repeat": 1, "epochs": 1,
                                        **overrides})


class LossHistory(Callback):
    """Collects the mean training loss of every epoch."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.losses.append(float(trainer.callback_metrics["train_loss_epoch"]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[MLFF, Engine, LossHistory, MVTecAD]:
    seed_everything(0)
    history = LossHistory()
    model = tiny_mlff(epochs=4)
    engine = helpers.quiet_engine(tmp_path_factory.mktemp("mlff"), callbacks=[history])
    data = helpers.datamodule()
    engine.fit(model, datamodule=data)
    return model, engine, history, data


def test_training_lowers_the_loss(trained) -> None:  # noqa: ANN001
    _, _, history, _ = trained
    assert len(history.losses) == 4
    assert all(np.isfinite(history.losses))
    assert history.losses[-1] < history.losses[0]


def test_test_metrics_are_reported(trained) -> None:  # noqa: ANN001
    model, engine, _, data = trained
    metrics = engine.test(model, datamodule=data, verbose=False)[0]
    for key in ("image_AUROC", "pixel_AUROC"):
        assert 0.0 <= metrics[key] <= 1.0


def test_checkpoint_round_trip_gives_identical_maps(trained, tmp_path: Path) -> None:  # noqa: ANN001
    model, engine, _, data = trained
    images = helpers.pick_test_images(data, count=4)
    restored = helpers.checkpoint_round_trip(model, engine, tmp_path / "mlff.ckpt", images)
    assert restored.hparams["feature_dim"] == 32 and restored.hparams["use_stl"] is True  # all model args recorded


def test_openvino_export_matches_torch_at_f32(trained, tmp_path: Path) -> None:  # noqa: ANN001
    model, engine, _, data = trained
    exported = engine.export(model, export_type="openvino", export_root=tmp_path)
    helpers.assert_exports_match(model, [exported], helpers.pick_test_images(data, step=9))


def test_empty_training_folder_names_the_dataset(tmp_path: Path) -> None:
    folder = helpers.small_copy(tmp_path, n_train=0)
    with pytest.raises(ValueError, match=r"category=brick.*0 image"):
        helpers.quiet_engine(tmp_path).fit(tiny_mlff(), datamodule=helpers.datamodule(folder.parent, "brick"))


def test_corrupt_training_image_is_named(tmp_path: Path) -> None:
    folder = helpers.small_copy(tmp_path, n_train=6)
    (folder / "train" / "good" / "broken.png").write_bytes(b"not a png")
    engine = helpers.quiet_engine(tmp_path)
    with pytest.raises(Exception, match="broken.png"):
        engine.fit(tiny_mlff(), datamodule=helpers.datamodule(tmp_path, "brick"))


def test_rgba_and_grayscale_images_train(tmp_path: Path) -> None:
    folder = helpers.small_copy(tmp_path, n_train=6)
    gray = Image.open(next((folder / "train" / "good").glob("*.png")))
    assert gray.mode == "L"
    rgba = gray.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "train" / "good" / "rgba.png")
    engine = helpers.quiet_engine(tmp_path)
    model = tiny_mlff()
    engine.fit(model, datamodule=helpers.datamodule(tmp_path, "brick"))
    assert torch.isfinite(torch.tensor(float(engine.trainer.callback_metrics["train_loss_epoch"])))


def test_nan_images_raise_a_clear_error() -> None:
    model = tiny_mlff()
    model.eval()
    images = torch.zeros(1, 3, helpers.IMAGE_SIZE, helpers.IMAGE_SIZE)
    images[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="(?i)nan"):
        model.model(images)


def test_cli_train_and_export_with_the_cpu_config(tmp_path: Path) -> None:
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


def test_the_model_sets_the_engine_epochs_and_decays_the_learning_rate(trained) -> None:  # noqa: ANN001
    """``epochs`` reaches the Engine (no max_epochs was passed to it); lr x ``lr_decay`` after each epoch."""
    model, engine, _, _ = trained
    assert engine.trainer.max_epochs == model.epochs == 4
    assert engine.trainer.current_epoch == 4
    expected = model.learning_rate * model.lr_decay**4
    assert model.optimizers().param_groups[0]["lr"] == pytest.approx(expected)
    assert helpers.tiny_model(MLFF).default_max_epochs == 200  # the paper's, by default
