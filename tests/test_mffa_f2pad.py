"""F2PAD's differentiable scorer for MFFA: registered, equal to MFFA's own patch scores, right gradients."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_mlff.models.mffa import MFFAModel
from anomalib_mlff.models.mffa.f2pad_scorer import MFFAScorer
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
def fitted(use_lgffp: bool = True) -> MFFAModel:
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


def test_f2pad_finds_the_mffa_scorer() -> None:
    assert scorer_class_for(fitted()) is MFFAScorer


def test_registration_and_scorer_whatever_is_imported_first(run_python) -> None:  # noqa: ANN001
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


@pytest.mark.parametrize("use_lgffp", [True, False], ids=["lgffp", "padim-embedding"])
def test_scores_at_the_initial_estimate_are_mffas_patch_score_product(use_lgffp: bool) -> None:
    model = fitted(use_lgffp)
    scorer = build_scorer(model, IMAGENET, num_candidates=4)
    assert scorer.stride == 4
    images = unit_images(2, seed=1)
    with torch.no_grad():
        embedding = scorer.embed(images)
        scores = scorer.prepare(embedding, FeatureWindow.full(2, (SIZE, SIZE), images.device))(embedding)
        nns, gaussian = model.patch_scores(model.embed(IMAGENET.from_unit(images)))
    expected = F.interpolate(nns, size=gaussian.shape[-2:], mode="nearest") * gaussian
    assert scores.shape == (2, 16, 16)
    torch.testing.assert_close(scores, expected[:, 0], rtol=2e-3, atol=1e-4)


def test_with_lgffp_f2pad_works_on_whole_images_only() -> None:
    region = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    region[0, 5:9, 5:9] = True
    with_cait = build_scorer(fitted(True), IMAGENET, num_candidates=4)
    without = build_scorer(fitted(False), IMAGENET, num_candidates=4)
    assert with_cait.window(region, 4).size == (SIZE, SIZE)
    assert without.window(region, 4).size < (SIZE, SIZE)  # a crop


def test_feature_term_gradient_matches_finite_differences() -> None:
    model = fitted()
    assert_feature_gradient_matches_finite_differences(build_scorer(model, IMAGENET, num_candidates=4), model)


def test_refine_runs_on_an_mffa_mask() -> None:
    assert_refine_runs(build_scorer(fitted(), IMAGENET, num_candidates=4))
