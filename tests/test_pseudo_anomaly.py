"""Pseudo anomalies: masks are exactly the changed pixels, draws are reproducible, ratios hold."""

from __future__ import annotations

import math

import pytest
import torch

from anomalib_mlff.components.pseudo_anomaly import (
    PseudoAnomalyGenerator,
    confetti_noise,
    cut_paste,
    cut_paste_scar,
)

METHODS = {"confetti": confetti_noise, "cutpaste": cut_paste, "scar": cut_paste_scar}


def noise_images(batch: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Random pixels: any moved or pasted pixel differs from the original (almost surely)."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_mask_is_exactly_the_changed_pixels(name: str) -> None:
    images = noise_images()
    corrupted, masks = METHODS[name](images, seeded(1))
    assert corrupted.shape == images.shape
    assert masks.shape == (4, 1, 64, 64)
    assert masks.dtype == images.dtype
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    changed = (corrupted != images).any(dim=1, keepdim=True)
    assert torch.equal(masks.bool(), changed)
    assert (masks.sum(dim=(1, 2, 3)) > 0).all()
    assert corrupted.min() >= 0 and corrupted.max() <= 1


@pytest.mark.parametrize("name", sorted(METHODS))
def test_single_image_and_seeded_determinism(name: str) -> None:
    image = noise_images(batch=1)[0]
    first, first_mask = METHODS[name](image, seeded(7))
    second, second_mask = METHODS[name](image, seeded(7))
    other, _ = METHODS[name](image, seeded(8))
    assert first.shape == (3, 64, 64) and first_mask.shape == (1, 64, 64)
    assert torch.equal(first, second) and torch.equal(first_mask, second_mask)
    assert not torch.equal(first, other)


def test_cut_paste_mask_is_one_rectangle_of_the_requested_area() -> None:
    images = noise_images(batch=8, size=100)
    _, masks = cut_paste(images, seeded(3))
    for mask in masks[:, 0]:
        rows, cols = torch.nonzero(mask, as_tuple=True)
        height = int(rows.max() - rows.min() + 1)
        width = int(cols.max() - cols.min() + 1)
        assert int(mask.sum()) == height * width  # filled rectangle
        assert 0.02 * 0.8 <= height * width / 100**2 <= 0.15 * 1.2  # rounding of the sides
        assert 0.3 * 0.8 <= width / height <= (1 / 0.3) * 1.2


def test_scar_is_thin_and_small() -> None:
    images = noise_images(batch=8, size=64)
    _, masks = cut_paste_scar(images, seeded(4))
    for mask in masks[:, 0]:
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert int(mask.sum()) <= 16 * 25 + 2 * (16 + 25)  # nearest rotation can add an edge
        assert rows.max() - rows.min() < math.hypot(16, 25) + 2
        assert cols.max() - cols.min() < math.hypot(16, 25) + 2


def test_white_confetti_only_brightens_equally_in_all_channels() -> None:
    image = torch.full((3, 64, 64), 0.4)
    corrupted, mask = confetti_noise(image, seeded(5), colour_blobs=(0, 0), white_blobs=(1, 1))
    changed = mask[0].bool()
    assert changed.any()
    delta = corrupted - image
    assert (delta[:, changed] > 0).all()
    torch.testing.assert_close(delta[0], delta[1])
    torch.testing.assert_close(delta[0], delta[2])
    # 8-bit steps: a change is at least one grey level, as for uint8 images.
    assert delta[:, changed].min() >= 1 / 255 - 1e-6


def test_grayscale_images_work() -> None:
    images = torch.rand(2, 1, 64, 64, generator=seeded(0))
    for method in METHODS.values():
        corrupted, masks = method(images, seeded(2))
        assert torch.equal(masks.bool(), corrupted != images)


def test_generator_ratio_zero_and_one() -> None:
    images = noise_images(batch=6)
    untouched, masks = PseudoAnomalyGenerator(ratio=0.0)(images, seeded(0))
    assert torch.equal(untouched, images) and masks.sum() == 0
    corrupted, masks = PseudoAnomalyGenerator(ratio=1.0, methods=("confetti", "cutpaste", "scar"))(images, seeded(0))
    assert (masks.sum(dim=(1, 2, 3)) > 0).all()
    assert torch.equal(masks.bool(), (corrupted != images).any(dim=1, keepdim=True))


def test_generator_half_ratio_and_determinism() -> None:
    images = noise_images(batch=40, size=32)
    generator = PseudoAnomalyGenerator(ratio=0.5, methods=("cutpaste",))
    first, first_masks = generator(images, seeded(11))
    second, second_masks = generator(images, seeded(11))
    assert torch.equal(first, second) and torch.equal(first_masks, second_masks)
    anomalous = int((first_masks.sum(dim=(1, 2, 3)) > 0).sum())
    assert 10 <= anomalous <= 30
    clean = first_masks.sum(dim=(1, 2, 3)) == 0
    assert torch.equal(first[clean], images[clean])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"methods": ()}, "methods"),
        ({"methods": ("blur",)}, "methods"),
    ],
)
def test_generator_rejects_bad_settings(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        PseudoAnomalyGenerator(**kwargs)


@pytest.mark.parametrize(
    "images",
    [
        torch.rand(64, 64),  # 2-D
        torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8),  # not float
        torch.randn(1, 3, 32, 32) * 3,  # normalised, not [0, 1]
    ],
)
def test_bad_images_are_rejected(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="images"):
        PseudoAnomalyGenerator(ratio=1.0)(images)
    with pytest.raises(ValueError, match="images"):
        cut_paste(images)
