"""F2PAD solved in batches: starts and images together give the masks of the one-at-a-time solve, images that
have stopped cost no backbone pass, and a solve stops once its mask settles.

"The same masks" is up to float rounding: torch's backward pass through the backbone for a batch of two differs
from two passes of one by about 1e-6, and the solver's sign-like steps carry such differences into the mask's
boundary. How far is measured on the one-at-a-time path itself: on this 64 px defect (about 150 mask pixels),
adding noise of 1e-6 to the image moved its refined mask to IoU 0.78-0.92 with the unperturbed one and its IoU
against the truth by up to 0.07. So the tests compare each batched mask with the one-at-a-time mask by how well
both match the truth (within 0.1) and check that no image receives another's mask.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from anomalib_mlff.post_processing.f2pad import ClassicalInpainter, F2PADSettings, Refinement, refine, refinement
from anomalib_mlff.post_processing.f2pad.objective import Objective
from anomalib_mlff.post_processing.f2pad.optimizer import (
    GradientSharing,
    MaskStability,
    OptimizerSettings,
    evaluate_rows,
    minimise,
)
from anomalib_mlff.post_processing.f2pad.scorers import build_scorer
from anomalib_mlff.post_processing.f2pad.window import FeatureWindow, dilate, positions_touched
from tests.f2pad_fixtures import IMAGENET, SIZE, defect_image, padim, patchcore

# 64 px versions of the default pixel quantities (as tests/test_f2pad_refine.py)
SMALL = F2PADSettings(dilation=3, crop_margin=16, reach=8, max_iterations=30, reestimation_iterations=10)


def iou(first: torch.Tensor, second: torch.Tensor) -> float:
    return float((first & second).sum() / (first | second).sum())


def assert_same_up_to_rounding(batched: Refinement, single: Refinement, truths: torch.Tensor) -> None:
    """Per image: a refined mask that matches the truth as well as the one-at-a-time one (IoU within 0.1), overlaps
    it more than any other image's, and came after about as many iterations (within 25%); see the module docstring.
    """
    for index, truth in enumerate(truths):
        assert single.pred_mask[index].any() and batched.pred_mask[index].any()
        assert abs(iou(batched.pred_mask[index], truth) - iou(single.pred_mask[index], truth)) <= 0.1
        own = iou(batched.pred_mask[index], single.pred_mask[index])
        others = single.pred_mask[torch.arange(len(truths)) != index]
        assert all(own > iou(batched.pred_mask[index], other) for other in others)
    assert ((batched.iterations - single.iterations).abs() <= 0.25 * single.iterations).all()


def coarse_mask(truth: torch.Tensor) -> torch.Tensor:
    """An initial mask that covers the defect and a margin around it."""
    return dilate(truth[None], 4)[0]


@pytest.mark.slow
@pytest.mark.parametrize("model", [patchcore, padim], ids=["patchcore", "padim"])
def test_starts_solved_together_give_the_masks_of_starts_solved_one_after_the_other(model) -> None:  # noqa: ANN001
    image, truth = defect_image()
    scorer = build_scorer(model(), IMAGENET, num_candidates=5)
    settings = replace(SMALL, images_per_solve=1)
    together = refine(image[None], coarse_mask(truth)[None], scorer, ClassicalInpainter(), None, settings)
    apart = refine(image[None], coarse_mask(truth)[None], scorer, ClassicalInpainter(), None,
                   replace(settings, batch_starts=False))
    assert_same_up_to_rounding(together, apart, truth[None])


@pytest.mark.slow
def test_images_refined_together_give_the_masks_of_images_refined_one_at_a_time() -> None:
    """An image and its mirror image: their regions need crops of one size, so the common crop is each one's own."""
    image, truth = defect_image()
    images = torch.stack([image, image.flip(-1)])
    masks = torch.stack([coarse_mask(truth), coarse_mask(truth).flip(-1)])
    scorer = build_scorer(patchcore(), IMAGENET, num_candidates=5)
    together = refine(images, masks, scorer, ClassicalInpainter(), None, replace(SMALL, images_per_solve=2))
    alone = refine(images, masks, scorer, ClassicalInpainter(), None, replace(SMALL, images_per_solve=1))
    assert_same_up_to_rounding(together, alone, torch.stack([truth, truth.flip(-1)]))


def small_objective(batch: int) -> tuple[Objective, torch.Tensor, list[int]]:
    """An objective over ``batch`` copies of the defect image; returns it, the images and a log of the backbone's
    batch sizes."""
    image, truth = defect_image()
    scorer = build_scorer(patchcore(), IMAGENET, num_candidates=5)
    sizes: list[int] = []
    embed = scorer._embed  # noqa: SLF001 - the test counts the backbone's passes

    def counted(normalised: torch.Tensor) -> torch.Tensor:
        sizes.append(normalised.shape[0])
        return embed(normalised)

    scorer._embed = counted  # noqa: SLF001
    images = image[None].repeat(batch, 1, 1, 1)
    region = dilate(coarse_mask(truth)[None], 3).repeat(batch, 1, 1)
    window = FeatureWindow.full(batch, (SIZE, SIZE), image.device)
    with torch.no_grad():
        scores = scorer.prepare(scorer.embed(images), window)
    objective = Objective(
        scorer=scorer, scores=scores, observed=images, region=region,
        positions=positions_touched(region, scorer.stride, 8), feature_scale=torch.ones(batch),
        sparsity_weight=torch.full((batch,), 0.5), eps=0.05, prior=None, prior_weight=0.0, smoothness_weight=0.01,
    )
    sizes.clear()
    return objective, images, sizes


@pytest.mark.slow
def test_the_objective_of_some_images_runs_the_backbone_on_those_images_only() -> None:
    objective, images, sizes = small_objective(3)
    estimate = (images * 0.9).requires_grad_(True)
    rows = torch.tensor([0, 2])
    values = evaluate_rows(objective, estimate, rows)
    assert sizes == [2]
    torch.testing.assert_close(values, objective(estimate)[rows].detach(), atol=1e-4, rtol=1e-5)
    (gradient,) = torch.autograd.grad(values.sum(), estimate)
    assert gradient[1].abs().sum() == 0 and gradient[0].abs().sum() > 0


@pytest.mark.slow
def test_a_repeated_objective_scores_each_copy_as_the_original() -> None:
    objective, images, _ = small_objective(2)
    estimate = images * 0.95
    repeated = objective.repeat(3)(torch.cat([estimate] * 3))
    torch.testing.assert_close(repeated, objective(estimate).repeat(3), atol=1e-4, rtol=1e-5)


def test_gradient_sharing_of_stacked_copies_is_the_sharing_of_each_copy() -> None:
    generator = torch.Generator().manual_seed(0)
    guidance = torch.rand(2, 3, 12, 12, generator=generator)
    region = torch.rand(2, 12, 12, generator=generator) > 0.3
    sharing = GradientSharing(guidance, region, 5, 1.0, 0.25)
    first, second = torch.randn(2, 3, 12, 12, generator=generator), torch.randn(2, 3, 12, 12, generator=generator)
    stacked = sharing(torch.cat([first, second]))
    torch.testing.assert_close(stacked, torch.cat([sharing(first), sharing(second)]), atol=1e-6, rtol=0)


def test_a_solve_stops_once_its_mask_has_settled_and_not_before() -> None:
    """J keeps falling (every pixel is pulled towards 0), but the mask, |X - X_N| > 0.1, is set from the first step."""
    observed = torch.full((2, 1, 8, 8), 0.5)
    region = torch.ones(2, 8, 8, dtype=torch.bool)

    def objective(normal: torch.Tensor) -> torch.Tensor:
        return normal.square().flatten(1).sum(1)

    def mask_of(guide: torch.Tensor, free: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
        return ((guide - normal).abs() > 0.1)[:, 0] & free

    start = torch.cat([torch.full((1, 1, 8, 8), 0.3), observed[:1]])  # image 0's mask is set, image 1's is empty
    unstopping = F2PADSettings(max_iterations=40, tolerance=0.0, mask_patience=None)
    base = OptimizerSettings.of(unstopping, default_tolerance=0.0)
    _, unstopped = minimise(objective, start, observed, region, base, share=False, mask_of=mask_of)
    assert unstopped.iterations.tolist() == [40, 40]
    settled = replace(base, mask_patience=5, mask_change=0.0)
    _, stopped = minimise(objective, start, observed, region, settled, share=False, mask_of=mask_of)
    assert stopped.iterations[0] == 5  # full from the start: settled once 5 iterations have passed
    assert 5 < stopped.iterations[1] < 40  # empty at first, then filling up as X_N falls past 0.4, then settled


def test_mask_stability_allows_the_given_share_of_changed_pixels() -> None:
    masks = iter([torch.zeros(1, 10, 10, dtype=torch.bool)] + [torch.ones(1, 10, 10, dtype=torch.bool)] * 3)
    stability = MaskStability(lambda _: next(masks), patience=1, change=0.0)
    estimate = torch.zeros(1, 1, 10, 10)
    assert not stability.update(estimate).item()  # nothing to compare with yet
    assert not stability.update(estimate).item()  # all 100 pixels changed
    assert stability.update(estimate).item()  # none changed over the last iteration
    loose = MaskStability(lambda _: torch.ones(1, 10, 10, dtype=torch.bool), patience=2, change=0.5)
    assert [loose.update(estimate).item() for _ in range(3)] == [False, False, True]


@pytest.mark.parametrize(
    ("name", "value"),
    [("mask_patience", 0), ("mask_patience", 2.5), ("images_per_solve", 0), ("images_per_solve", True),
     ("mask_change", -0.1), ("mask_change", 1.5)],
)
def test_bad_batching_and_stopping_settings_are_refused_naming_the_parameter(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        F2PADSettings(**{name: value})


@pytest.mark.slow
def test_a_cpu_refines_one_image_at_a_time_unless_images_per_solve_groups_them(monkeypatch) -> None:  # noqa: ANN001
    image, truth = defect_image()
    images = torch.stack([image, image.flip(-1)])
    masks = torch.stack([coarse_mask(truth), coarse_mask(truth).flip(-1)])
    scorer = build_scorer(patchcore(), IMAGENET, num_candidates=5)
    groups: list[int] = []
    solve = refinement._refine_at_model_size  # noqa: SLF001 - the test records the groups refined together

    def recorded(observed: torch.Tensor, *args: object) -> Refinement:
        groups.append(len(observed))
        return solve(observed, *args)

    monkeypatch.setattr(refinement, "_refine_at_model_size", recorded)
    quick = replace(SMALL, max_iterations=2, reestimation_iterations=0)
    refine(images, masks, scorer, ClassicalInpainter(), None, quick)
    assert groups == [1, 1]
    groups.clear()
    refine(images, masks, scorer, ClassicalInpainter(), None, replace(quick, images_per_solve=2))
    assert groups == [2]
