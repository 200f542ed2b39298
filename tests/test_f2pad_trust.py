"""F2PAD's trust rules, its weight calibration, the feature-scale fallback and its NaN errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.models import Patchcore

from anomalib_mlff import F2PAD
from anomalib_mlff.post_processing.f2pad import ClassicalInpainter, PixelPrior, refine
from anomalib_mlff.post_processing.f2pad.calibration import (
    MASK_THRESHOLD_FACTORS,
    SEARCH,
    calibrate,
    synthetic_defects,
)
from anomalib_mlff.post_processing.f2pad.objective import NonFiniteError, calibrate_feature_scale
from anomalib_mlff.post_processing.f2pad.trust import explained, unexplained_area
from anomalib_mlff.post_processing.f2pad.scorers import DifferentiableScorer, PatchcoreScorer, build_scorer
from tests.f2pad_fixtures import IMAGENET, SIZE, defect_image, load_images, padim, patchcore, training_images
from tests.test_f2pad_refine import SMALL, initial_mask, iou, prior


def test_explained_is_the_share_of_the_inpainting_drop_the_recovered_image_achieves() -> None:
    observed, start = torch.tensor([10.0, 10.0, 10.0, 4.0]), torch.tensor([2.0, 2.0, 2.0, 6.0])
    recovered = torch.tensor([2.0, 6.0, 10.0, 9.0])
    torch.testing.assert_close(explained(observed, start, recovered), torch.tensor([1.0, 0.5, 0.0, 1.0]))


def test_unexplained_area_is_the_share_of_the_mask_outside_the_cells_whose_score_fell() -> None:
    drop = torch.zeros(2, 4, 4)
    drop[:, 1, 1] = 1.0  # the cell rows 4-7, columns 4-7 of a 16 px image
    drop[:, 3, 3] = 0.05  # below a tenth of the largest fall: not counted
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, 4:8, 4:8] = True
    mask[:, 4:8, 8:12] = True  # half the mask lies in a cell whose score did not fall
    judged = torch.tensor([True, False])
    torch.testing.assert_close(unexplained_area(mask, drop, judged), torch.tensor([0.5, 0.0]))
    assert unexplained_area(mask[:1], torch.zeros(1, 4, 4), judged[:1]).item() == 1.0  # no score fell
    assert unexplained_area(torch.zeros_like(mask[:1]), drop[:1], judged[:1]).item() == 0.0


@pytest.mark.slow
def test_a_mask_grown_far_beyond_the_lowered_scores_is_refused_though_explained_is_high() -> None:
    """A prior fitted on green rejects every brick pixel: colour growth floods the image from the defect's mask.

    The flooded pixels lower no score, but they cannot lower ``explained`` either; ``max_unexplained_area`` refuses it.
    """
    image, truth = defect_image()
    start_mask = initial_mask(padim(), image, truth)
    scorer = build_scorer(padim(), IMAGENET, num_candidates=5)
    noise = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0))
    green_prior = PixelPrior().fit((torch.tensor([0.1, 0.8, 0.1]) + 0.02 * noise).clamp(0, 1))
    flooding = replace(SMALL, growth_margin=64, prior_weight=0.0)  # the prior drives the growth, not the solve
    trusted_anyway = refine(image[None], start_mask[None], scorer, ClassicalInpainter(), green_prior,
                            replace(flooding, max_unexplained_area=None))
    assert not trusted_anyway.fallback.any()
    assert trusted_anyway.pred_mask.sum() > 10 * truth.sum()
    assert float(trusted_anyway.explained[0]) >= flooding.min_explained
    assert float(trusted_anyway.unexplained_area[0]) > flooding.max_unexplained_area
    result = refine(image[None], start_mask[None], scorer, ClassicalInpainter(), green_prior, flooding)
    assert result.fallback.tolist() == [True]
    assert torch.equal(result.pred_mask[0], start_mask)


@pytest.mark.slow
def test_explained_is_measured_against_the_region_inpainted_whatever_the_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PaDiM's scores do not depend on the start (PatchCore's candidates do), so the three runs must agree."""
    from anomalib_mlff.post_processing.f2pad import refinement  # noqa: PLC0415

    image, truth = defect_image()
    start_mask = initial_mask(padim(), image, truth)
    scorer = build_scorer(padim(), IMAGENET, num_candidates=5)
    seen: list[float] = []

    def spy(observed: torch.Tensor, start: torch.Tensor, recovered: torch.Tensor) -> torch.Tensor:
        seen.append(float(start[0]))
        return explained(observed, start, recovered)

    monkeypatch.setattr(refinement, "explained", spy)
    for starts in (("mask",), ("region_in_mask", "region"), ("region",)):
        fast = replace(SMALL, starts=starts, max_iterations=2, reestimation_iterations=1)
        refine(image[None], start_mask[None], scorer, ClassicalInpainter(), None, fast)
    assert seen[0] == pytest.approx(seen[1], rel=1e-5) == pytest.approx(seen[2], rel=1e-5)


@pytest.mark.slow
def test_a_refinement_made_to_fail_keeps_the_backbone_mask() -> None:
    image, truth = defect_image()
    start_mask = initial_mask(patchcore(), image, truth)
    scorer = build_scorer(patchcore(), IMAGENET, num_candidates=5)
    # no |A| of [0, 1] pixels exceeds this threshold: the refined mask is empty, the defect left outside it
    failing = replace(SMALL, mask_threshold=10.0)
    trusted_anyway = refine(
        image[None], start_mask[None], scorer, ClassicalInpainter(), None,
        replace(failing, min_explained=0, max_unexplained_area=None),
    )
    assert not trusted_anyway.pred_mask.any() and not trusted_anyway.fallback.any()
    result = refine(image[None], start_mask[None], scorer, ClassicalInpainter(), None, failing)
    assert result.fallback.tolist() == [True]
    assert float(result.explained[0]) < failing.min_explained
    assert torch.equal(result.pred_mask[0], start_mask)


@pytest.mark.slow
def test_a_successful_refinement_is_trusted() -> None:
    image, truth = defect_image()
    start_mask = initial_mask(patchcore(), image, truth)
    scorer = build_scorer(patchcore(), IMAGENET, num_candidates=5)
    result = refine(image[None], start_mask[None], scorer, ClassicalInpainter(), prior(), SMALL)
    assert result.fallback.tolist() == [False]
    assert iou(result.pred_mask[0], truth) > iou(start_mask, truth) + 0.1


class FlooredScorer(DifferentiableScorer):
    """PatchCore's scores minus their maximum at the initial estimate, floored at 0 (as MLFF's scorer floors).

    At the inpainted start every score is 0 and has no gradient: the feature scale g0 collapses there.
    """

    def __init__(self, inner: DifferentiableScorer) -> None:
        self.inner, self.stride, self.alignment, self.model = inner, inner.stride, inner.alignment, inner.model

    def _embed(self, normalised: torch.Tensor) -> torch.Tensor:
        return self.inner._embed(normalised)  # noqa: SLF001

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.embed(images)

    def prepare(self, initial_embedding, window, positions=None):  # noqa: ANN001, ANN201
        scores = self.inner.prepare(initial_embedding, window, positions)
        offset = scores(initial_embedding).amax().detach()
        return lambda embedding: (scores(embedding) - offset).clamp_min(0)


@pytest.mark.slow
def test_a_collapsed_feature_scale_falls_back_and_the_mask_still_improves() -> None:
    image, truth = defect_image()
    start_mask = initial_mask(patchcore(), image, truth)
    scorer = FlooredScorer(build_scorer(patchcore(), IMAGENET, num_candidates=5))
    captured = {}
    from anomalib_mlff.post_processing.f2pad import refinement  # noqa: PLC0415

    def spy(objective, start):  # noqa: ANN001, ANN202
        captured["scale"] = calibrate_feature_scale(objective, start)
        return captured["scale"]

    original = refinement.calibrate_feature_scale
    refinement.calibrate_feature_scale = spy
    try:
        result = refine(image[None], start_mask[None], scorer, ClassicalInpainter(), prior(), SMALL)
    finally:
        refinement.calibrate_feature_scale = original
    assert captured["scale"].item() > 1e-6  # not the 1e-12 floor that made L / g0 a barrier
    assert iou(result.pred_mask[0], truth) > iou(start_mask, truth) + 0.1


def test_nan_in_an_image_names_the_image() -> None:
    image, truth = defect_image()
    images = torch.stack([image, image])
    images[1, 0, 3, 3] = float("nan")
    masks = torch.stack([truth, truth])
    scorer = build_scorer(patchcore(), IMAGENET, num_candidates=5)
    with pytest.raises(NonFiniteError, match=r"images of image\(s\) \[1\]"):
        refine(images, masks, scorer, ClassicalInpainter(), None, SMALL)


class NaNScorer(PatchcoreScorer):
    """PatchCore whose scores turn NaN once the estimate moves: a NaN in the objective and its gradients."""

    def prepare(self, initial_embedding, window, positions=None):  # noqa: ANN001, ANN201
        scores = super().prepare(initial_embedding, window, positions)
        return lambda embedding: scores(embedding) * torch.where(
            (embedding - initial_embedding).abs().amax() > 0, float("nan"), 1.0
        )


def test_nan_in_the_objective_names_the_image() -> None:
    image, truth = defect_image()
    scorer = NaNScorer(patchcore(), IMAGENET, num_candidates=5)
    masks = torch.stack([torch.zeros_like(truth), truth])
    with pytest.raises(NonFiniteError, match=r"image\(s\) \[1\]"):
        refine(torch.stack([image, image]), masks, scorer, ClassicalInpainter(), None, SMALL)


def _lightning_patchcore() -> Patchcore:
    module = Patchcore(backbone="resnet18", layers=("layer2", "layer3"), pre_trained=False, evaluator=False,
                       visualizer=False, pre_processor=Patchcore.configure_pre_processor(image_size=(SIZE, SIZE)))
    module.model = patchcore()
    return module


def test_post_processor_names_the_file_of_a_nan_image_or_map() -> None:
    image, _ = defect_image()
    module = _lightning_patchcore()
    normalised = IMAGENET.from_unit(torch.stack([image, image]))
    raw_map = torch.ones(2, 1, SIZE, SIZE)
    raw_map[1, 0, 0, 0] = float("nan")
    batch = ImageBatch(image=normalised, image_path=["a/000.png", "b/001.png"], anomaly_map=raw_map.clone())
    f2pad = F2PAD(initial_threshold=0.5, calibration_images=0, **{k: v for k, v in _small_kwargs().items()})
    with pytest.raises(ValueError, match=r"anomaly maps of b/001.png"):
        f2pad.refine_batch(module, batch, raw_map)
    normalised[0, 1, 5, 5] = float("nan")
    paths = ["a/000.png", "b/001.png"]
    batch = ImageBatch(image=normalised, image_path=paths, anomaly_map=torch.ones(2, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"images of a/000.png"):
        f2pad.refine_batch(module, batch, torch.ones(2, 1, SIZE, SIZE))


def _small_kwargs() -> dict:
    return {"dilation": 3, "crop_margin": 16, "reach": 8, "max_iterations": 15, "reestimation_iterations": 5}


@pytest.mark.slow
def test_calibration_is_deterministic_and_tries_every_weight() -> None:
    normals = load_images("test/good", 3)
    scorer = build_scorer(patchcore(), IMAGENET, num_candidates=5)
    fast = replace(SMALL, max_iterations=10, reestimation_iterations=3)

    def anomaly_map(images: torch.Tensor) -> torch.Tensor:
        return patchcore()(IMAGENET.from_unit(images)).anomaly_map[:, 0]

    pixel_prior = PixelPrior().fit(training_images().permute(0, 2, 3, 1).reshape(-1, 3)[::7])
    first = calibrate(normals, anomaly_map, scorer, ClassicalInpainter(), pixel_prior, fast, seed=3)
    second = calibrate(normals, anomaly_map, scorer, ClassicalInpainter(), pixel_prior, fast, seed=3)
    assert first == second
    assert {name for weights, _ in first.trials for name in weights} == {
        "sparsity_weight", "prior_weight", "smoothness_weight", "mask_threshold"}
    tried = {tuple(weights.values()) for weights, _ in first.trials}
    solves = 1 + sum(len(factors) for factors in SEARCH.values())
    assert len(tried) == len(first.trials) == solves * len(MASK_THRESHOLD_FACTORS)
    best = max(score for _, score in first.trials)
    assert first.weights in [weights for weights, score in first.trials if score == best]


def test_synthetic_defects_are_seeded_and_not_empty() -> None:
    normals = load_images("test/good", 4)
    images, masks = synthetic_defects(normals, seed=1)
    again, masks_again = synthetic_defects(normals, seed=1)
    assert torch.equal(images, again) and torch.equal(masks, masks_again)
    assert masks.flatten(1).any(1).all()
    changed = (images - normals).abs().amax(1) > 0
    assert torch.equal(changed, masks)
