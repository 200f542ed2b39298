"""F2PAD's differentiable scorers for MLFF and MFFA: registered, equal to each model's own scores, right
gradients, the window each one needs."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mlff.models.mffa import MFFAModel
from anomalib_mlff.models.mffa.f2pad_scorer import MFFAScorer
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
def mlff(use_score_head: bool = True) -> MLFFModel:
    """A random-initialised MLFF network in eval mode; its score head's output centred on zero."""
    torch.manual_seed(0)
    model = MLFFModel(backbone="resnet18", pre_trained=False, feature_dim=16, tem_levels=8,
                      use_score_head=use_score_head).eval()
    if use_score_head:  # centre the head's output on the test images, so it takes both signs
        with torch.no_grad():
            _, head = model.extract_features(IMAGENET.from_unit(unit_images(2, seed=1)))
            model.score_head.bias -= head.median()
    return model


@cache
def mffa(use_lgffp: bool = True) -> MFFAModel:
    """A random-initialised MFFA fitted on six images."""
    torch.manual_seed(0)
    model = MFFAModel(
        backbone="resnet18",
        pre_trained=False,
        cait_backbone="cait_xxs24_224",
        cait_blocks=2,
        n_gaussian_features=16,
        coreset_ratio=0.25,
        use_lgffp=use_lgffp,
    ).eval()
    with torch.no_grad():
        model.fit(model.embed(IMAGENET.from_unit(unit_images(6, seed=0))))
    return model


# model name -> (its network, the scorer class F2PAD must pick for it, the candidates its scorer searches)
MODELS: dict[str, tuple[Callable[[], nn.Module], type, int]] = {
    "mlff": (mlff, MLFFScorer, 1),
    "mffa": (mffa, MFFAScorer, 4),
}


@pytest.mark.parametrize("name", MODELS)
def test_f2pad_finds_the_models_scorer(name: str) -> None:
    network, scorer_class, _ = MODELS[name]
    assert scorer_class_for(network()) is scorer_class


@pytest.mark.parametrize(
    ("network", "num_candidates", "whole"),
    [(mlff, 1, True), (mffa, 4, True), (lambda: mffa(use_lgffp=False), 4, False)],
    ids=["mlff", "mffa-lgffp", "mffa-padim-embedding"],
)
def test_f2pad_works_on_whole_images_or_on_a_crop(network: Callable[[], nn.Module], num_candidates: int,
                                                  whole: bool) -> None:
    """MLFF and MFFA with LGFFP (CaiT) see the whole image; MFFA without LGFFP scores a crop around the region."""
    region = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    region[0, 5:9, 5:9] = True
    size = build_scorer(network(), IMAGENET, num_candidates=num_candidates).window(region, 4).size
    if whole:
        assert size == (SIZE, SIZE)
    else:
        assert size < (SIZE, SIZE)  # a crop


@pytest.mark.parametrize("name", MODELS)
def test_feature_term_gradient_matches_finite_differences(name: str) -> None:
    network, _, num_candidates = MODELS[name]
    model = network()
    assert_feature_gradient_matches_finite_differences(
        build_scorer(model, IMAGENET, num_candidates=num_candidates), model
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_refine_runs_on_the_models_mask(name: str) -> None:
    network, _, num_candidates = MODELS[name]
    assert_refine_runs(build_scorer(network(), IMAGENET, num_candidates=num_candidates))


def scores_at_the_initial_estimate(model: nn.Module, num_candidates: int, images: torch.Tensor) -> torch.Tensor:
    """The model's F2PAD scorer (stride 4) evaluated on the whole images it was prepared on."""
    scorer = build_scorer(model, IMAGENET, num_candidates=num_candidates)
    assert scorer.stride == 4
    with torch.no_grad():
        embedding = scorer.embed(images)
        window = FeatureWindow.full(images.shape[0], (SIZE, SIZE), images.device)
        return scorer.prepare(embedding, window)(embedding)


@pytest.mark.parametrize("use_score_head", [True, False], ids=["score-head", "pseudo-huber"])
def test_mlff_scores_are_mlffs_own_scores_floored_at_zero(use_score_head: bool) -> None:
    model = mlff(use_score_head)
    images = unit_images(2, seed=1)
    scores = scores_at_the_initial_estimate(model, 1, images)
    with torch.no_grad():
        psi, head = model.extract_features(IMAGENET.from_unit(images))
    own = head if use_score_head else pseudo_huber_distance(psi)  # what MLFF upsamples into its anomaly map
    assert scores.shape == (2, SIZE // 4, SIZE // 4)
    assert (own > 0).any() and (own < 0).any() == use_score_head  # the floor matters only with the head
    torch.testing.assert_close(scores, own[:, 0].clamp_min(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_lgffp", [True, False], ids=["lgffp", "padim-embedding"])
def test_mffa_scores_at_the_initial_estimate_are_mffas_patch_score_product(use_lgffp: bool) -> None:
    model = mffa(use_lgffp)
    images = unit_images(2, seed=1)
    scores = scores_at_the_initial_estimate(model, 4, images)
    with torch.no_grad():
        nns, gaussian = model.patch_scores(model.embed(IMAGENET.from_unit(images)))
    expected = F.interpolate(nns, size=gaussian.shape[-2:], mode="nearest") * gaussian
    assert scores.shape == (2, 16, 16)
    torch.testing.assert_close(scores, expected[:, 0], rtol=2e-3, atol=1e-4)


@pytest.mark.slow  # fresh interpreters importing anomalib
def test_mffa_registration_and_scorer_whatever_is_imported_first(run_python) -> None:  # noqa: ANN001
    """Importing F2PAD first (which registers the models, whose MFFA package imports F2PAD) leaves no half-import."""
    result = run_python(
        "import warnings; warnings.simplefilter('error', RuntimeWarning);"
        "import anomalib_mlff.post_processing;"
        "import anomalib.models as zoo;"
        "from anomalib_mlff.post_processing.f2pad.scorers import scorer_class_for;"
        "model = zoo.get_model('mffa', backbone='resnet18', cait_backbone='cait_xxs24_224',"
        " n_gaussian_features=50, pre_trained=False);"
        "print(type(model).__name__, scorer_class_for(model.model).__name__)"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["MFFA", "MFFAScorer"]


def test_mlff_feature_scale_does_not_collapse_where_its_scores_are_floored_flat() -> None:
    """MLFF's scores are floored at 0; with every score of the inpainted start below 0, the median gradient
    there is 0 and g0 would be 1e-12. It falls back to the observed image's scale."""
    from anomalib_mlff.post_processing.f2pad.objective import Objective, calibrate_feature_scale  # noqa: PLC0415
    from anomalib_mlff.post_processing.f2pad.window import dilate, positions_touched  # noqa: PLC0415

    model = mlff()
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
