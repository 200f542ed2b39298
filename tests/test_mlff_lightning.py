"""MLFF inside anomalib: training, checkpoints, export, CLI and bad input, on tiny CPU settings."""

from __future__ import annotations

import shutil
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
from anomalib_mlff.deploy import openvino_inferencer
from anomalib_mlff.models.mlff import MLFF
from tests.conftest import REPO_ROOT, VENV_BIN

IMAGE_SIZE = 64


def tiny_mlff(**overrides: object) -> MLFF:
    """Random-initialised resnet18 MLFF small enough for a unit test."""
    settings = {
        "backbone": "resnet18",
        "pre_trained": False,
        "feature_dim": 32,
        "tem_levels": 8,
        "ptfem_levels": 4,
        "repeat": 1,
        "learning_rate": 0.01,
        "visualizer": False,
        "pre_processor": MLFF.configure_pre_processor(image_size=(IMAGE_SIZE, IMAGE_SIZE)),
    }
    settings.update(overrides)
    return MLFF(**settings)


def datamodule(root: Path = EMBEDDED_ROOT, category: str = "brick") -> MVTecAD:
    return MVTecAD(root=root, category=category, train_batch_size=16, eval_batch_size=16, num_workers=0)


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
    model = tiny_mlff()
    engine = Engine(
        default_root_dir=tmp_path_factory.mktemp("mlff"),
        max_epochs=4,
        logger=False,
        enable_progress_bar=False,
        callbacks=[history],
    )
    data = datamodule()
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


def predict_maps(model: MLFF, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(images).anomaly_map


def test_checkpoint_round_trip_gives_identical_maps(trained, tmp_path: Path) -> None:  # noqa: ANN001
    model, engine, _, data = trained
    path = tmp_path / "mlff.ckpt"
    engine.trainer.save_checkpoint(path)
    restored = MLFF.load_from_checkpoint(path)
    images = torch.stack([data.test_data[i].image for i in range(4)])
    torch.testing.assert_close(predict_maps(restored, images), predict_maps(model, images), rtol=0, atol=0)


def test_openvino_export_matches_torch_at_f32(trained, tmp_path: Path) -> None:  # noqa: ANN001
    model, engine, _, data = trained
    exported = engine.export(model, export_type="openvino", export_root=tmp_path)
    inferencer = openvino_inferencer(exported)
    images = torch.stack([data.test_data[i].image for i in range(0, len(data.test_data), 9)])
    expected = predict_maps(model, images)
    for index in range(images.shape[0]):
        result = inferencer.predict(images[index : index + 1])
        np.testing.assert_allclose(np.asarray(result.anomaly_map), expected[index : index + 1].numpy(), atol=1e-4)


def test_empty_training_folder_names_the_dataset(tmp_path: Path) -> None:
    (tmp_path / "part" / "train" / "good").mkdir(parents=True)
    shutil.copytree(EMBEDDED_ROOT / "brick" / "test", tmp_path / "part" / "test")
    shutil.copytree(EMBEDDED_ROOT / "brick" / "ground_truth", tmp_path / "part" / "ground_truth")
    engine = Engine(default_root_dir=tmp_path, max_epochs=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"category=part.*0 image"):
        engine.fit(tiny_mlff(), datamodule=datamodule(tmp_path, "part"))


def small_copy(tmp_path: Path, n_train: int = 6) -> Path:
    """A copy of the brick category with only a few training images."""
    target = tmp_path / "brick"
    (target / "train" / "good").mkdir(parents=True)
    for source in sorted((EMBEDDED_ROOT / "brick" / "train" / "good").glob("*.png"))[:n_train]:
        shutil.copy(source, target / "train" / "good")
    shutil.copytree(EMBEDDED_ROOT / "brick" / "test", target / "test")
    shutil.copytree(EMBEDDED_ROOT / "brick" / "ground_truth", target / "ground_truth")
    return target


def test_corrupt_training_image_is_named(tmp_path: Path) -> None:
    folder = small_copy(tmp_path)
    (folder / "train" / "good" / "broken.png").write_bytes(b"not a png")
    engine = Engine(default_root_dir=tmp_path, max_epochs=1, logger=False, enable_progress_bar=False)
    with pytest.raises(Exception, match="broken.png"):
        engine.fit(tiny_mlff(), datamodule=datamodule(tmp_path, "brick"))


def test_rgba_and_grayscale_images_train(tmp_path: Path) -> None:
    folder = small_copy(tmp_path)
    gray = Image.open(next((folder / "train" / "good").glob("*.png")))
    assert gray.mode == "L"
    rgba = gray.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "train" / "good" / "rgba.png")
    engine = Engine(default_root_dir=tmp_path, max_epochs=1, logger=False, enable_progress_bar=False)
    model = tiny_mlff()
    engine.fit(model, datamodule=datamodule(tmp_path, "brick"))
    assert torch.isfinite(torch.tensor(float(engine.trainer.callback_metrics["train_loss_epoch"])))


def test_nan_images_raise_a_clear_error() -> None:
    model = tiny_mlff()
    model.eval()
    images = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    images[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="(?i)nan"):
        model.model(images)


def test_cli_train_and_export_with_the_cpu_config(tmp_path: Path) -> None:
    """`anomalib train` on the shipped config (shortened), then `anomalib export` of its checkpoint."""
    anomalib = str(VENV_BIN / "anomalib")
    config = str(REPO_ROOT / "configs" / "mlff_cpu.yaml")
    common = ["--config", config, "--data.root", str(EMBEDDED_ROOT), "--default_root_dir", str(tmp_path)]
    train = subprocess.run(  # noqa: S603
        [anomalib, "train", *common, "--trainer.max_epochs", "1", "--model.repeat", "1",
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
