"""Helpers of the Lightning tests of MLFF and MFFA: embedded data, quiet engines, maps, checkpoints, exports."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule

from anomalib_mlff.data import EMBEDDED_ROOT
from anomalib_mlff.deploy import openvino_inferencer

IMAGE_SIZE = 64


def tiny_model(model_class: type[AnomalibModule], **settings: object) -> AnomalibModule:
    """Random-initialised resnet18 model at ``IMAGE_SIZE`` px, no visualiser, lr 0.01; ``settings`` add or override."""
    defaults = {
        "backbone": "resnet18",
        "pre_trained": False,
        "learning_rate": 0.01,
        "visualizer": False,
        "pre_processor": model_class.configure_pre_processor(image_size=(IMAGE_SIZE, IMAGE_SIZE)),
    }
    return model_class(**{**defaults, **settings})


def datamodule(root: Path = EMBEDDED_ROOT, category: str = "brick", batch_size: int = 16) -> MVTecAD:
    """anomalib's MVTecAD datamodule on ``root`` (the embedded data by default), no worker processes."""
    return MVTecAD(root=root, category=category, train_batch_size=batch_size, eval_batch_size=batch_size,
                   num_workers=0)


def quiet_engine(root: Path, **kwargs: object) -> Engine:
    """An Engine without logger or progress bar."""
    return Engine(default_root_dir=root, logger=False, enable_progress_bar=False, **kwargs)


def small_copy(tmp_path: Path, n_train: int, category: str = "brick", n_test: int | None = None) -> Path:
    """A copy of an embedded category under ``tmp_path``: its first ``n_train`` training images and, per test
    folder (good and each defect), its first ``n_test`` images with their masks (all with ``None``)."""
    source = EMBEDDED_ROOT / category
    target = tmp_path / category
    (target / "train" / "good").mkdir(parents=True)
    for image in sorted((source / "train" / "good").glob("*.png"))[:n_train]:
        shutil.copy(image, target / "train" / "good")
    for folder in sorted((source / "test").iterdir()):
        (target / "test" / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.png"))[:n_test]:
            shutil.copy(image, target / "test" / folder.name)
            mask = source / "ground_truth" / folder.name / f"{image.stem}_mask.png"
            if mask.exists():
                (target / "ground_truth" / folder.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(mask, target / "ground_truth" / folder.name)
    return target


def pick_test_images(data: MVTecAD, step: int = 1, count: int | None = None) -> torch.Tensor:
    """Every ``step``-th test image of a set-up datamodule (at most ``count``), stacked."""
    indices = list(range(0, len(data.test_data), step))[:count]
    return torch.stack([data.test_data[i].image for i in indices])


def predict_maps(model: AnomalibModule, images: torch.Tensor) -> torch.Tensor:
    """The torch model's anomaly maps in eval mode."""
    model.eval()
    with torch.no_grad():
        return model(images).anomaly_map


def checkpoint_round_trip(model: AnomalibModule, engine: Engine, path: Path, images: torch.Tensor) -> AnomalibModule:
    """Save the engine's checkpoint, load it with the model's class; the maps must be bit-identical.

    The checkpoint is edited to say it was trained from ImageNet weights in files that this machine
    lacks (an offline site restoring another site's model): loading must not need them.
    """
    engine.trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    hparams = checkpoint["hyper_parameters"]
    hparams["pre_trained"] = True
    for name in type(model).initial_weight_args:
        if name != "pre_trained":
            hparams[name] = str(path.parent / f"missing_{name}.pth")
    torch.save(checkpoint, path)
    restored = type(model).load_from_checkpoint(path)
    torch.testing.assert_close(predict_maps(restored, images), predict_maps(model, images), rtol=0, atol=0)
    return restored


def assert_exports_match(model: AnomalibModule, paths: list[Path], images: torch.Tensor, atol: float = 1e-4) -> None:
    """Each exported model (ONNX file or OpenVINO IR) gives the torch maps, one image at a time."""
    expected = predict_maps(model, images)
    for path in paths:
        inferencer = openvino_inferencer(path)
        for index in range(images.shape[0]):
            result = inferencer.predict(images[index : index + 1])
            np.testing.assert_allclose(np.asarray(result.anomaly_map), expected[index : index + 1].numpy(), atol=atol)
