"""F2PAD's differentiable scorer for MFFA: registered, equal to MFFA's own patch scores, right gradients."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_mlff.components.normalization import PixelRange
from anomalib_mlff.models.mffa import MFFAModel
from anomalib_mlff.models.mffa.f2pad_scorer import MFFAScorer
from anomalib_mlff.post_processing.f2pad import ClassicalInpainter, RefinementSettings, refine
from anomalib_mlff.post_processing.f2pad.optimizer import OptimizerSettings
from anomalib_mlff.post_processing.f2pad.scorers import build_scorer, scorer_class_for
from anomalib_mlff.post_processing.f2pad.window import FeatureWindow

SIZE = 64
IMAGENET = PixelRange(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def unit_images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


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
    assert FeatureWindow.around(region, 4, with_cait.alignment).size == (SIZE, SIZE)
    assert FeatureWindow.around(region, 4, without.alignment).size < (SIZE, SIZE)  # a crop


def test_feature_term_gradient_matches_finite_differences() -> None:
    model = fitted()
    scorer = build_scorer(model, IMAGENET, num_candidates=4)  # its dry run needs the float model
    model.double()
    try:
        image = unit_images(1, seed=2).double()
        with torch.no_grad():
            scores = scorer.prepare(scorer.embed(image), FeatureWindow.full(1, (SIZE, SIZE), image.device))
        loss = lambda x: scores(scorer.embed(x)).sum()  # noqa: E731
        estimate = image.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(estimate), estimate)
        direction = torch.randn(image.shape, generator=torch.Generator().manual_seed(0), dtype=image.dtype)
        step = 1e-6  # ReLU / max-pool kinks and candidate switches are crossed at larger steps
        with torch.no_grad():
            numeric = (loss(image + step * direction) - loss(image - step * direction)) / (2 * step)
        assert gradient.abs().sum() > 0
        torch.testing.assert_close((gradient * direction).sum(), numeric, rtol=1e-4, atol=1e-6)
    finally:
        model.float()


def test_refine_runs_on_an_mffa_mask() -> None:
    scorer = build_scorer(fitted(), IMAGENET, num_candidates=4)
    image = unit_images(1, seed=3)
    image[:, :, 20:30, 24:34] = torch.tensor([0.9, 0.1, 0.7]).view(1, 3, 1, 1)
    initial = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    initial[0, 18:32, 22:36] = True
    settings = RefinementSettings(optimizer=OptimizerSettings(max_iterations=3), reestimation_iterations=2)
    result = refine(image, initial, scorer, ClassicalInpainter(), None, settings)
    assert result.pred_mask.shape == (1, SIZE, SIZE)
    assert 0 < int(result.iterations[0]) <= 5
    assert torch.isfinite(result.normal_image).all()
