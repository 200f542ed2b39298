"""F2PAD's training samples stay within their budgets however many batches training has."""

from __future__ import annotations

import torch

from anomalib_mlff.post_processing.f2pad.sampling import TrainingSamples


def test_budgets_bound_what_is_kept_over_many_batches() -> None:
    torch.manual_seed(0)
    samples = TrainingSamples()
    for _ in range(40):  # 320 images of 16 x 16
        samples.add(torch.rand(8, 3, 16, 16), pixel_budget=500, image_budget=5)
    assert samples.pixel_count == 500
    assert samples.image_count == 5
    pixels, images = samples.take_pixels(), samples.take_images()
    assert pixels.shape == (500, 3)
    assert images.shape == (5, 3, 16, 16)
    assert ((pixels >= 0) & (pixels <= 1)).all()
    assert samples.take_pixels() is None
    assert samples.take_images() is None  # taken once


def test_pixels_are_drawn_from_every_image_of_a_batch() -> None:
    """Each image gives budget // 50 pixels, so a batch of constant images shows every image's value."""
    samples = TrainingSamples()
    batch = torch.arange(4, dtype=torch.float32).div(4).reshape(4, 1, 1, 1).expand(4, 3, 8, 8)
    samples.add(batch, pixel_budget=1000, image_budget=0)
    pixels = samples.take_pixels()
    assert pixels.shape == (4 * 20, 3)
    assert set(pixels[:, 0].tolist()) == {0.0, 0.25, 0.5, 0.75}
    assert samples.take_images() is None


def test_zero_budgets_keep_nothing() -> None:
    samples = TrainingSamples()
    samples.add(torch.rand(2, 3, 8, 8), pixel_budget=0, image_budget=0)
    assert samples.take_pixels() is None
    assert samples.take_images() is None
