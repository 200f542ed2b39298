"""F2PAD's procedure on tensors: the optimiser lowers the objective, the refined mask beats the initial
one on a synthetic defect, and bad inputs (empty masks, other image sizes) are handled."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from anomalib_mlff import F2PAD
from anomalib_mlff.post_processing.f2pad import ClassicalInpainter, F2PADSettings, PixelPrior, Refinement, refine
from anomalib_mlff.post_processing.f2pad.objective import Objective, calibrate_feature_scale
from anomalib_mlff.post_processing.f2pad.optimizer import OptimizerSettings, minimise
from anomalib_mlff.post_processing.f2pad.refinement import denoise_magnitude, initial_estimates, lowest_energy_solve
from anomalib_mlff.post_processing.f2pad.scorers import DifferentiableScorer, build_scorer
from anomalib_mlff.post_processing.f2pad.window import FeatureWindow, dilate, positions_touched
from tests.f2pad_fixtures import IMAGENET, SIZE, defect_image, padim, patchcore, training_images

# the paper's pixel quantities are for 256 px images; these tests run at 64 px
SMALL = F2PADSettings(dilation=3, crop_margin=16, reach=8, max_iterations=150, tolerance=0.05)


def prior() -> PixelPrior:
    pixels = training_images().permute(0, 2, 3, 1).reshape(-1, 3)
    return PixelPrior().fit(pixels[torch.randperm(pixels.shape[0], generator=torch.Generator().manual_seed(0))[:4000]])


def iou(mask: torch.Tensor, truth: torch.Tensor) -> float:
    return float((mask & truth).sum() / (mask | truth).sum())


def initial_mask(model: torch.nn.Module, image: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The model's mask at the threshold that maximises F1 against the truth, as the paper starts."""
    with torch.no_grad():
        anomaly_map = model(IMAGENET.from_unit(image[None])).anomaly_map[0, 0]
    candidates = torch.quantile(anomaly_map.flatten(), torch.linspace(0.5, 0.995, 100))
    f1 = [float(2 * ((anomaly_map > t) & truth).sum() / ((anomaly_map > t).sum() + truth.sum())) for t in candidates]
    return anomaly_map > candidates[int(torch.tensor(f1).argmax())]


@pytest.mark.slow
def test_an_optimisation_run_lowers_the_objective() -> None:
    image, truth = defect_image()
    scorer = build_scorer(patchcore(), IMAGENET, num_candidates=5)
    masks = dilate(truth[None], 2)
    observed = image[None]
    start = observed.clone()  # the defect still in: the feature term is high
    window = FeatureWindow.full(1, (SIZE, SIZE), image.device)
    with torch.no_grad():
        scores = scorer.prepare(scorer.embed(start), window)
    objective = Objective(
        scorer=scorer,
        scores=scores,
        observed=observed,
        region=dilate(masks, 3),
        positions=positions_touched(dilate(masks, 3), scorer.stride, 8),
        feature_scale=torch.ones(1),
        sparsity_weight=torch.tensor([0.5]),
        eps=0.05,
        prior=prior(),
        prior_weight=0.01,
        smoothness_weight=0.01,
    )
    objective = replace(objective, feature_scale=calibrate_feature_scale(objective, start))
    settings = OptimizerSettings.of(F2PADSettings(max_iterations=40, tolerance=0.0), default_tolerance=0.0)
    normal, trace = minimise(objective, start, observed, objective.region, settings)
    assert trace.values.shape == (41, 1)
    assert objective(normal).item() < 0.9 * trace.values[0].item()
    assert normal.min() >= 0 and normal.max() <= 1  # valid pixel range
    outside = ~objective.region[:, None].expand_as(normal)
    assert torch.equal(normal[outside], observed[outside])  # only the region moves


def no_solver(settings: F2PADSettings) -> F2PADSettings:
    """``settings`` with both iteration caps at 0: the starts, thresholds, colour growth and trust rules only."""
    return replace(settings, max_iterations=0, reestimation_iterations=0)


def assert_refinement_beats_initial(result: Refinement, start_mask: torch.Tensor, truth: torch.Tensor) -> None:
    """The bar of the end-to-end IoU tests: the refined mask beats the initial one by 0.1 IoU, and the recovered
    image no longer holds the magenta defect of :func:`defect_image`."""
    before, after = iou(start_mask, truth), iou(result.pred_mask[0], truth)
    assert after > before + 0.1, (before, after)
    recovered = result.normal_image[0][:, truth]
    assert (recovered - torch.tensor([0.9, 0.2, 0.6])[:, None]).norm(dim=0).median() > 0.3


@pytest.mark.slow
@pytest.mark.parametrize("model", [patchcore, padim], ids=["patchcore", "padim"])
def test_refined_mask_beats_the_initial_mask_on_a_synthetic_defect(model) -> None:  # noqa: ANN001
    """The coarse initial mask covers the defect and much around it: colour growth cannot help, the solver must
    shrink it. The same run with no iterations is the reference the solver has to beat."""
    image, truth = defect_image()
    start_mask = initial_mask(model(), image, truth)
    scorer = build_scorer(model(), IMAGENET, num_candidates=5)
    result = refine(image[None], start_mask[None], scorer, ClassicalInpainter(), prior(), SMALL)
    assert_refinement_beats_initial(result, start_mask, truth)
    assert result.normal_image.shape == image[None].shape
    unsolved = refine(image[None], start_mask[None], scorer, ClassicalInpainter(), prior(), no_solver(SMALL))
    assert iou(result.pred_mask[0], truth) > iou(unsolved.pred_mask[0], truth) + 0.1


class NeverCalled(DifferentiableScorer):
    """A scorer that fails if F2PAD touches the model."""

    def __init__(self) -> None:
        self.stride, self.alignment = 8, 16

    feature_extractor = layers = None  # type: ignore[assignment]

    def _embed(self, normalised: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the model was run for an image with an empty mask")

    def prepare(self, initial_embedding, window, positions=None):  # noqa: ANN001, ANN201
        raise AssertionError("the model was run for an image with an empty mask")


def test_an_empty_initial_mask_returns_at_once_with_an_empty_mask() -> None:
    image, _ = defect_image()
    empty = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    images = torch.stack([image, image])
    result = refine(images, empty, NeverCalled(), ClassicalInpainter(), None, SMALL)
    assert not result.pred_mask.any()
    assert torch.equal(result.normal_image, images)
    assert torch.all(result.iterations == 0)


@pytest.mark.slow
def test_only_images_with_a_mask_are_refined() -> None:
    image, truth = defect_image()
    masks = torch.stack([torch.zeros_like(truth), dilate(truth[None], 2)[0]])
    scorer = build_scorer(patchcore(), IMAGENET, num_candidates=5)
    result = refine(torch.stack([image, image]), masks, scorer, ClassicalInpainter(), None, SMALL)
    assert not result.pred_mask[0].any() and result.iterations[0] == 0
    assert result.pred_mask[1].any() and result.iterations[1] > 0


@pytest.mark.slow
def test_images_of_another_size_than_the_model_input_are_refined_at_the_model_size() -> None:
    large, truth = defect_image(size=96)
    scorer = build_scorer(padim(), IMAGENET, num_candidates=5)  # PaDiM only scores its 64 px grid
    result = refine(large[None], dilate(truth[None], 3), scorer, ClassicalInpainter(), prior(), SMALL)
    assert result.pred_mask.shape == (1, 96, 96)
    assert result.normal_image.shape == (1, 3, 96, 96)
    assert iou(result.pred_mask[0], truth) > 0.5


@pytest.mark.slow
def test_inpainting_the_dilated_region_starts_away_from_a_defect_the_initial_mask_half_covers() -> None:
    """A coarse mask over only part of the defect: inpainted alone, the start keeps the observed defect in the rest
    of it; inpainting the dilated region replaces those pixels too (from outside it), and the mask is no worse."""
    image, truth = defect_image()
    half = half_mask(truth)
    scorer = build_scorer(patchcore(), IMAGENET, num_candidates=5)
    results = {
        start: refine(image[None], half[None], scorer, ClassicalInpainter(), prior(), replace(SMALL, starts=(start,)))
        for start in ("mask", "region")
    }
    missed = truth & ~half & dilate(half[None], SMALL.dilation)[0]
    assert missed.sum() > 10

    def start_change(start: str) -> float:
        change = torch.linalg.vector_norm(results[start].initial_normal_image[0] - image, dim=0)
        return float(change[missed].mean())

    assert start_change("mask") == 0.0  # still the defect's colour: only the initial mask was inpainted
    assert start_change("region") > 0.2
    assert iou(results["region"].pred_mask[0], truth) >= iou(results["mask"].pred_mask[0], truth) - 0.02


def half_mask(truth: torch.Tensor) -> torch.Tensor:
    """The defect's right half: a coarse initial mask that misses part of it."""
    columns = truth.any(0).nonzero().flatten()
    half = truth.clone()
    half[:, : int(columns.float().mean())] = False
    return half


def test_with_several_starts_each_image_keeps_the_solve_with_the_lowest_objective() -> None:
    """J with a deep minimum at 0.2 and a shallow one at 0.8: per image the start in the deep basin wins."""
    observed = torch.full((2, 1, 8, 8), 0.5)
    region = torch.ones(2, 8, 8, dtype=torch.bool)

    def objective(x: torch.Tensor) -> torch.Tensor:  # two basins per pixel, the one at 0.2 deeper
        deep, shallow = (x - 0.2).square(), (x - 0.8).square() + 0.05
        return torch.minimum(deep, shallow).flatten(1).sum(1)

    near_deep, near_shallow = torch.full_like(observed, 0.25), torch.full_like(observed, 0.75)
    starts = [torch.cat([near_shallow[:1], near_deep[1:]]), torch.cat([near_deep[:1], near_shallow[1:]])]
    settings = OptimizerSettings.of(F2PADSettings(max_iterations=30, tolerance=0.0), default_tolerance=0.0)
    normal, chosen, iterations = lowest_energy_solve(objective, starts, observed, region, settings, share=False)
    assert chosen.tolist() == [1, 0]  # image 0 from the second start, image 1 from the first
    assert (normal - 0.2).abs().max() < 0.05
    singles = [minimise(objective, start, observed, region, settings, share=False)[1].iterations for start in starts]
    assert torch.equal(iterations, singles[0] + singles[1])


def test_region_in_mask_start_is_the_region_fill_inside_the_initial_mask_only() -> None:
    image, truth = defect_image()
    mask = half_mask(truth)[None]
    region = dilate(mask, SMALL.dilation)
    starts = ("region", "region_in_mask")
    by_region, in_mask = initial_estimates(image[None], mask, region, ClassicalInpainter(), starts)
    assert torch.equal(in_mask, torch.where(mask[:, None], by_region, image[None]))
    assert not torch.equal(by_region, image[None])


def test_unknown_or_empty_starts_are_refused_naming_the_parameter() -> None:
    image, truth = defect_image()
    scorer = build_scorer(patchcore(), IMAGENET, num_candidates=5)
    for starts in ((), ("region", "blurred")):
        with pytest.raises(ValueError, match="starts"):
            refine(image[None], truth[None], scorer, ClassicalInpainter(), None, replace(SMALL, starts=starts))


def test_median_filter_drops_isolated_pixels_and_fills_speckle_inside_a_defect() -> None:
    """|A| > t on a blob with one-pixel gaps and on lone pixels of the ring: the filtered mask is the blob."""
    magnitude = torch.zeros(1, 32, 32)
    magnitude[:, 8:20, 8:20] = 0.3
    magnitude[:, 10:18:3, 10:18:3] = 0.0  # crumbs of the normal colour inside the defect
    magnitude[:, 2, 28] = magnitude[:, 25, 3] = 0.5  # lone pixels the optimiser left in the ring
    region = torch.ones(1, 32, 32, dtype=torch.bool)
    blob = torch.zeros(1, 32, 32, dtype=torch.bool)
    blob[:, 8:20, 8:20] = True
    filtered = denoise_magnitude(magnitude, region, 5) > 0.1
    assert not torch.equal(magnitude > 0.1, blob)
    interior = blob.clone()
    interior[:, 8:20, 8:20] = False
    interior[:, 9:19, 9:19] = True  # a 5x5 median rounds the blob's corners, nothing else
    assert torch.equal(filtered & interior, interior) and not (filtered & ~blob).any()
    assert torch.equal(denoise_magnitude(magnitude, region, 1), magnitude)
    outside = denoise_magnitude(magnitude, torch.zeros_like(region), 5)
    assert not outside.any()  # confined to the region


@pytest.mark.slow
def test_refined_mask_is_the_filtered_magnitude_above_the_threshold() -> None:
    image, truth = defect_image()
    scorer = build_scorer(patchcore(), IMAGENET, num_candidates=5)
    settings = replace(SMALL, median_size=3, max_iterations=20)
    result = refine(image[None], truth[None], scorer, ClassicalInpainter(), None, settings)
    assert torch.equal(result.pred_mask, result.magnitude > settings.mask_threshold)
    assert torch.equal(result.anomaly_map(settings.mask_threshold) > 0.5, result.pred_mask)


def test_an_even_or_non_positive_median_size_is_refused_naming_the_parameter() -> None:
    image, truth = defect_image()
    scorer = build_scorer(patchcore(), IMAGENET, num_candidates=5)
    for size in (0, 4, -3, 2.0):
        with pytest.raises(ValueError, match="median_size"):
            refine(image[None], truth[None], scorer, ClassicalInpainter(), None, replace(SMALL, median_size=size))
    with pytest.raises(ValueError, match="median_size"):
        F2PAD(median_size=6)
