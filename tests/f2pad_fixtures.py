"""Tiny fitted PatchCore / PaDiM models and a synthetic defect image for the F2PAD tests (64 px, CPU)."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from anomalib.models.image.padim.torch_model import PadimModel
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from PIL import Image

from anomalib_mlff.components.normalization import PixelRange
from anomalib_mlff.data import EMBEDDED_ROOT

SIZE = 64
IMAGENET = PixelRange(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def load_images(folder: str, count: int, size: int = SIZE) -> torch.Tensor:
    """The first ``count`` brick images of a folder of the embedded data, RGB in [0, 1]."""
    paths = sorted((EMBEDDED_ROOT / "brick" / folder).glob("*.png"))[:count]
    arrays = [np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)) for path in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


@cache
def training_images() -> torch.Tensor:
    """Normal training images."""
    return load_images("train/good", 20)


@cache
def patchcore() -> PatchcoreModel:
    """A fitted PatchCore on random resnet18 features."""
    torch.manual_seed(0)
    model = PatchcoreModel(layers=["layer2", "layer3"], backbone="resnet18", pre_trained=False).train()
    with torch.no_grad():
        model(IMAGENET.from_unit(training_images()))
    model.subsample_embedding(0.25)
    return model.eval()


@cache
def padim() -> PadimModel:
    """A fitted PaDiM on random resnet18 features."""
    torch.manual_seed(0)
    model = PadimModel(backbone="resnet18", pre_trained=False, n_features=40).train()
    with torch.no_grad():
        model(IMAGENET.from_unit(training_images()))
    model.fit()
    return model.eval()


def defect_image(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """A normal test image with a magenta ellipse pasted on it, and the ellipse's mask."""
    normal = load_images("test/good", 1, size)[0]
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    scale = size / SIZE
    mask = ((rows - 36 * scale) ** 2 / (7 * scale) ** 2 + (cols - 30 * scale) ** 2 / (5 * scale) ** 2) <= 1
    image = torch.where(mask, torch.tensor([0.9, 0.2, 0.6]).view(3, 1, 1), normal)
    return image, mask
