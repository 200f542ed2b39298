"""F2PAD's differentiable scorer for MLFF: registered, equal to MLFF's own scores, right gradients, whole images."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from anomalib_mlff.models.mlff import MLFFModel
from anomalib_mlff.models.mlff.anomaly_map import pseudo_huber_distance
from anomalib_mlff.models.mlff.f2pad_scorer import MLFFScorer
from anomalib_mlff.post_processing.f2pad.scorers import build_scorer, scorer_class_for
from anomalib_mlff.post_processing.f2pad.window import FeatureWindow
from tests.f2pad_fixtures import (
    IMAGENET,
    SIZE,
    assert_feature_gradient_matches_finite_differences,
    assert_refine_runs,
    unit_images,
)


@cache
def network(use_score_head: bool = True) -> MLFFModel:
    """A random-initialised MLFF network in eval mode; its score head's output centred on zero."""
    torch.manual_seed(0)
    model = MLFFModel(backbone="resnet18", pre_trained=False, feature_dim=16, tem_levels=8,
                      use_score_head=use_score_head).eval()
    if use_score_head:  # centre the head's output on the test images, so it takes both signs
        with torch.no_grad():
            _, head = model.extract_features(IMAGENET.from_unit(unit_images(2, seed=1)))
            model.score_head.bias -= head.median()
    return model


def test_f2pad_finds_the_mlff_scorer() -> None:
    assert scorer_class_for(network()) is MLFFScorer


@pytest.mark.parametrize("use_score_head", [True, False], ids=["score-head", "pseudo-huber"])
def test_scores_are_mlffs_own_scores_floored_at_zero(use_score_head: bool) -> None:
    model = network(use_score_head)
    scorer = build_scorer(model, IMAGENET, num_candidates=1)
    assert scorer.stride == 4
    images = unit_images(2, seed=1)
    with torch.no_grad():
        embedding = scorer.embed(images)
        scores = scorer.prepare(embedding, FeatureWindow.full(2, (SIZE, SIZE), images.device))(embedding)
        psi, head = model.extract_features(IMAGENET.from_unit(images))
    own = head if use_score_head else pseudo_huber_distance(psi)  # what MLFF upsamples into its anomaly map
    assert scores.shape == (2, SIZE // 4, SIZE // 4)
    assert (own > 0).any() and (own < 0).any() == use_score_head  # the floor matters only with the head
    torch.testing.assert_close(scores, own[:, 0].clamp_min(0), rtol=1e-5, atol=1e-6)


def test_f2pad_works_on_whole_images() -> None:
    region = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    region[0, 5:9, 5:9] = True
    scorer = build_scorer(network(), IMAGENET, num_candidates=1)
    assert scorer.window(region, 4).size == (SIZE, SIZE)


def test_feature_term_gradient_matches_finite_differences() -> None:
    model = network()
    assert_feature_gradient_matches_finite_differences(build_scorer(model, IMAGENET, num_candidates=1), model)


def test_refine_runs_on_an_mlff_mask() -> None:
    assert_refine_runs(build_scorer(network(), IMAGENET, num_candidates=1))


def test_feature_scale_does_not_collapse_where_mlffs_scores_are_floored_flat() -> None:
    """MLFF's scores are floored at 0; with every score of the inpainted start below 0, the median gradient
    there is 0 and g0 used to become 1e-12. It now falls back to the observed image's scale."""
    from anomalib_mlff.post_processing.f2pad.objective import Objective, calibrate_feature_scale  # noqa: PLC0415
    from anomalib_mlff.post_processing.f2pad.window import dilate, positions_touched  # noqa: PLC0415

    model = network()
    scorer = build_scorer(model, IMAGENET, num_candidates=1)
    observed = unit_images(1, seed=4)
    region = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    region[0, 24:40, 24:40] = True
    start = observed.clone()
    start[:, :, region[0]] = observed[:, :, region[0]].mean(-1, keepdim=True)  # a flat fill, as inpainting gives
    window = FeatureWindow.full(1, (SIZE, SIZE), observed.device)
    with torch.no_grad():
        _, head = model.extract_features(IMAGENET.from_unit(start))
    shift = float(head[0].amax()) + 1e-3  # every score of the start is now <= 0: floored flat
    with torch.no_grad():
        model.score_head.bias -= shift
    try:
        scores = scorer.prepare(scorer.embed(start), window)
        objective = Objective(
            scorer=scorer, scores=scores, observed=observed, region=dilate(region, 2),
            positions=positions_touched(dilate(region, 2), scorer.stride, 8), feature_scale=torch.ones(1),
            sparsity_weight=torch.ones(1), eps=0.05, prior=None, prior_weight=0.0, smoothness_weight=0.0,
        )
        with torch.no_grad():
            assert float(scores(scorer.embed(start)).amax()) == 0.0  # the collapse: no gradient at the start
        scale = calibrate_feature_scale(objective, start)
        assert torch.isfinite(scale).all() and float(scale) > 1e-6
    finally:
        with torch.no_grad():
            model.score_head.bias += shift
