"""F2PAD's mask grows into connected pixels of a colour the pixel prior rejects, and nowhere else."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from anomalib_mlff import F2PAD
from anomalib_mlff.post_processing.f2pad import ClassicalInpainter, F2PADSettings, PixelPrior, refine
from anomalib_mlff.post_processing.f2pad.growth import connected_to, grow_into_colour_outliers
from anomalib_mlff.post_processing.f2pad.scorers import PadimScorer, build_scorer
from anomalib_mlff.post_processing.f2pad.window import dilate
from tests.f2pad_fixtures import IMAGENET, SIZE, load_images, padim, training_images
from tests.test_f2pad_refine import SMALL, iou, prior


def test_connected_to_keeps_only_regions_touching_the_mask() -> None:
    mask = torch.zeros(1, 12, 12, dtype=torch.bool)
    mask[0, 2, 2] = True
    candidates = torch.zeros_like(mask)
    candidates[0, 2:6, 3:6] = True  # touches the seed (8-connected)
    candidates[0, 9:11, 9:11] = True  # apart
    grown = connected_to(mask, candidates)
    assert grown[0, 2:6, 3:6].all() and grown[0, 2, 2]
    assert not grown[0, 9:11, 9:11].any()
    assert grown.sum() == 1 + 12


def test_growth_fills_a_tint_beyond_a_partial_mask_and_the_map_agrees() -> None:
    """Grey prior; a blue-tinted square whose mask covers a third of it grows to the square, not the grey."""
    grey = torch.rand(4000, 1, generator=torch.Generator().manual_seed(0)) * 0.2 + 0.3
    colour_prior = PixelPrior().fit(grey.expand(-1, 3).contiguous())
    image = torch.full((1, 3, 32, 32), 0.4)
    image[:, 2, 8:24, 8:24] += 0.15  # a tint of 0.15 in blue
    truth = torch.zeros(1, 32, 32, dtype=torch.bool)
    truth[:, 8:24, 8:24] = True
    mask = torch.zeros_like(truth)
    mask[:, 8:24, 8:13] = True
    magnitude = mask.float() * 0.2
    grown, grown_magnitude = grow_into_colour_outliers(mask, magnitude, image, colour_prior, 9.0, 0.1, 5)
    assert iou(grown[0], truth[0]) > 0.9 > iou(mask[0], truth[0]) + 0.5
    assert torch.equal(grown, grown_magnitude > 0.1)  # the map's threshold is still the mask
    assert torch.equal(grown_magnitude[mask], magnitude[mask])  # |A| kept where the mask was


def test_growth_reaches_only_the_pixels_it_is_given() -> None:
    """A tint across the whole width; growth limited to the left 20 columns stops there, unlimited it does not."""
    grey = torch.rand(4000, 1, generator=torch.Generator().manual_seed(0)) * 0.2 + 0.3
    colour_prior = PixelPrior().fit(grey.expand(-1, 3).contiguous())
    image = torch.full((1, 3, 32, 32), 0.4)
    image[:, 2, 8:24, :] += 0.15
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[:, 8:24, 8:13] = True
    within = torch.zeros_like(mask)
    within[:, :, :20] = True
    unbounded, _ = grow_into_colour_outliers(mask, mask.float() * 0.2, image, colour_prior, 9.0, 0.1, 5)
    bounded, magnitude = grow_into_colour_outliers(
        mask, mask.float() * 0.2, image, colour_prior, 9.0, 0.1, 5, within=within
    )
    assert unbounded[0, 12, 25:].all()
    assert bounded[0, 12, 13:20].all() and not (bounded & ~within).any()
    assert not (magnitude[~within] > 0).any()


class WholeImagePadim(PadimScorer):
    """PaDiM scored on whole images, as models with image-wide features are: no crop bounds the growth."""

    crop_allowed = False


def magenta_band() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A normal test image crossed by a magenta band, its mask, and an initial mask on a short piece of it."""
    normal = load_images("test/good", 1, SIZE)[0]
    truth = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    truth[28:36, :] = True
    image = torch.where(truth, torch.tensor([0.9, 0.2, 0.6]).view(3, 1, 1), normal)
    start = torch.zeros_like(truth)
    start[28:36, 4:10] = True
    return image, truth, start


def test_on_a_whole_image_scorer_growth_stops_at_the_region_plus_the_margin() -> None:
    """The band runs across the image; the map is 0 and the mask empty beyond R plus ``growth_margin``."""
    image, _, start = magenta_band()
    scorer = WholeImagePadim(padim(), IMAGENET)
    trusting = replace(SMALL, max_iterations=10, reestimation_iterations=3, min_explained=0.0,
                       max_unexplained_area=None)
    region = dilate(start[None], trusting.dilation)
    bounded = refine(image[None], start[None], scorer, ClassicalInpainter(), prior(),
                     replace(trusting, growth_margin=8))
    limit = dilate(region, 8)
    assert (bounded.pred_mask & ~region).any()  # it grew beyond R ...
    assert not (bounded.pred_mask & ~limit).any()  # ... but not beyond the margin
    assert not (bounded.magnitude[~limit] > 0).any()
    wide = refine(image[None], start[None], scorer, ClassicalInpainter(), prior(), replace(trusting, growth_margin=64))
    assert (wide.pred_mask & ~limit).any()  # the margin, not the band's end, stopped it


def test_growth_margin_must_be_a_non_negative_integer() -> None:
    for value in (-1, 2.5, True):
        with pytest.raises(ValueError, match="growth_margin"):
            F2PADSettings(growth_margin=value)


def partly_masked_magenta() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A normal test image with a magenta rectangle, its mask, and an initial mask on its left quarter only."""
    normal = load_images("test/good", 1, SIZE)[0]
    truth = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    truth[20:44, 16:44] = True
    image = torch.where(truth, torch.tensor([0.9, 0.2, 0.6]).view(3, 1, 1), normal)
    start = torch.zeros_like(truth)
    start[20:44, 16:23] = True
    return image, truth, start


@pytest.mark.slow
def test_refine_recovers_the_part_of_a_defect_the_initial_mask_missed() -> None:
    """PaDiM at 64 px; a magenta square whose initial mask covers its left quarter: growth reaches the rest."""
    image, truth, start = partly_masked_magenta()
    scorer = build_scorer(padim(), IMAGENET, num_candidates=5)
    colour_prior = prior()
    without = refine(image[None], start[None], scorer, ClassicalInpainter(), colour_prior,
                     replace(SMALL, colour_growth=None))
    grown = refine(image[None], start[None], scorer, ClassicalInpainter(), colour_prior, SMALL)
    assert iou(grown.pred_mask[0], truth) > iou(without.pred_mask[0], truth) + 0.2
    assert iou(grown.pred_mask[0], truth) > 0.8
    assert torch.equal(grown.pred_mask, grown.anomaly_map(SMALL.mask_threshold) > 0.5)


@pytest.mark.slow
def test_growth_needs_a_fitted_prior_and_is_off_without_one() -> None:
    image, _, start = partly_masked_magenta()
    scorer = build_scorer(padim(), IMAGENET, num_candidates=5)
    settings = replace(SMALL, max_iterations=5)
    result = refine(image[None], start[None], scorer, ClassicalInpainter(), None, settings)
    assert not result.pred_mask[0, :, 30:].any()  # nothing beyond the dilated region: no prior, no growth


@pytest.mark.parametrize("value", [0, -1.0, float("nan")])
def test_colour_growth_must_be_a_positive_cost(value: float) -> None:
    with pytest.raises(ValueError, match="colour_growth"):
        F2PADSettings(colour_growth=value)
    with pytest.raises(ValueError, match="colour_growth"):
        F2PAD(colour_growth=value)


def test_training_images_fit_a_prior_that_rejects_magenta() -> None:
    """The premise of the refine test: the embedded brick's prior puts magenta far above its own pixels."""
    colour_prior = prior()
    own = colour_prior(training_images()[:2]).median()
    magenta = colour_prior(torch.tensor([0.9, 0.2, 0.6]).view(1, 3, 1, 1)).item()
    assert own < 9.0 < magenta
