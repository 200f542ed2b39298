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
from anomalib_mlff.post_processing.f2pad import ClassicalInpainter, DifferentiableScorer, F2PADSettings, refine
from anomalib_mlff.post_processing.f2pad.window import FeatureWindow

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


def unit_images(count: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """Uniform random RGB images in [0, 1]."""
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_feature_gradient_matches_finite_differences(
    scorer: DifferentiableScorer, model: torch.nn.Module, image: torch.Tensor | None = None, step: float = 1e-6
) -> None:
    """d(sum of window scores)/d(pixels) along a random direction equals a central difference (float64).

    The model runs in float64 here and is turned back to float32 afterwards. ``image``: ``(1, 3, SIZE,
    SIZE)`` in [0, 1], random by default.
    """
    model.double()
    try:
        image = (unit_images(1, seed=2) if image is None else image).double()
        with torch.no_grad():
            scores = scorer.prepare(scorer.embed(image), FeatureWindow.full(1, (SIZE, SIZE), image.device))
        loss = lambda x: scores(scorer.embed(x)).sum()  # noqa: E731
        estimate = image.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(estimate), estimate)
        direction = torch.randn(image.shape, generator=torch.Generator().manual_seed(0), dtype=image.dtype)
        # step: ReLU / max-pool / quantisation kinks and candidate switches are crossed at larger steps
        with torch.no_grad():
            numeric = (loss(image + step * direction) - loss(image - step * direction)) / (2 * step)
        assert gradient.abs().sum() > 0
        torch.testing.assert_close((gradient * direction).sum(), numeric, rtol=1e-4, atol=1e-6)
    finally:
        model.float()


def assert_refine_runs(scorer: DifferentiableScorer) -> None:
    """A few iterations of the whole procedure on a pasted square give a mask and a finite normal image."""
    image = unit_images(1, seed=3)
    image[:, :, 20:30, 24:34] = torch.tensor([0.9, 0.1, 0.7]).view(1, 3, 1, 1)
    initial = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    initial[0, 18:32, 22:36] = True
    settings = F2PADSettings(max_iterations=3, tolerance=0.05, reestimation_iterations=2)
    result = refine(image, initial, scorer, ClassicalInpainter(), None, settings)
    assert result.pred_mask.shape == (1, SIZE, SIZE)
    assert 0 < int(result.iterations[0]) <= 3 * len(settings.starts) + 2  # each start's cap, then the re-estimation
    assert torch.isfinite(result.normal_image).all()
