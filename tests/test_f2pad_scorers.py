"""F2PAD's feature term: the scorers agree with anomalib's own scores and their gradients are right."""

from __future__ import annotations

import pytest
import torch
from anomalib.models.image.padim.anomaly_map import AnomalyMapGenerator
from torch import nn

from anomalib_mlff.post_processing.f2pad.scorers import (
    MissingScorerError,
    PadimScorer,
    PatchcoreScorer,
    build_scorer,
    scorer_class_for,
)
from anomalib_mlff.post_processing.f2pad.window import FeatureWindow
from tests.f2pad_fixtures import (
    IMAGENET,
    SIZE,
    assert_feature_gradient_matches_finite_differences,
    defect_image,
    padim,
    patchcore,
)


def test_scorers_are_found_for_anomalib_models() -> None:
    assert scorer_class_for(patchcore()) is PatchcoreScorer
    assert scorer_class_for(padim()) is PadimScorer


def test_a_model_without_scorer_gets_an_error_naming_it() -> None:
    with pytest.raises(MissingScorerError, match=r"no differentiable scorer for Linear .*DifferentiableScorer"):
        scorer_class_for(nn.Linear(2, 2))


def test_patchcore_scores_at_the_initial_estimate_equal_the_nearest_neighbour_distance() -> None:
    model = patchcore()
    image, _ = defect_image()
    scorer = build_scorer(model, IMAGENET, num_candidates=5)
    with torch.no_grad():
        embedding = scorer.embed(image[None])
        scores = scorer.prepare(embedding, FeatureWindow.full(1, (SIZE, SIZE), image.device))(embedding)
        flat = model.reshape_embedding(embedding)
        nearest, _ = model.nearest_neighbors(flat, n_neighbors=1)
    assert scorer.stride == 8 and scorer.alignment == 16
    torch.testing.assert_close(scores.flatten(), nearest.flatten(), rtol=1e-4, atol=1e-4)


def test_padim_scores_equal_the_squared_mahalanobis_distance_on_any_window() -> None:
    model = padim()
    scorer = build_scorer(model, IMAGENET, num_candidates=5)
    image, _ = defect_image()
    with torch.no_grad():
        embedding = scorer.embed(image[None].repeat(2, 1, 1, 1))
        full = scorer.prepare(embedding, FeatureWindow.full(2, (SIZE, SIZE), image.device))(embedding)
        stats = [model.gaussian.mean, model.gaussian.inv_covariance]
        expected = AnomalyMapGenerator.compute_distance(embedding, stats)[:, 0] ** 2
        torch.testing.assert_close(full, expected, rtol=1e-3, atol=1e-3)
        # a window at a different place per image picks the Gaussians of its own positions
        window = FeatureWindow(torch.tensor([[16, 0], [32, 16]]), (32, 32), (SIZE, SIZE))
        crops = torch.stack([embedding[0, :, 4:12, 0:8], embedding[1, :, 8:16, 4:12]])
        windowed = scorer.prepare(crops, window)(crops)
    torch.testing.assert_close(windowed[0], full[0, 4:12, 0:8])
    torch.testing.assert_close(windowed[1], full[1, 8:16, 4:12])


def test_padim_scores_only_the_given_positions_per_image_and_zero_elsewhere() -> None:
    scorer = build_scorer(padim(), IMAGENET, num_candidates=5)
    image, _ = defect_image()
    window = FeatureWindow.full(2, (SIZE, SIZE), image.device)
    with torch.no_grad():
        embedding = scorer.embed(torch.stack([image, image.flip(-1)]))
        full = scorer.prepare(embedding, window)(embedding)
        positions = torch.zeros(full.shape, dtype=torch.bool)
        positions[0, 2:5, 3:9] = True  # a different set, of a different size, per image
        positions[1, 10:, :4] = True
        some = scorer.prepare(embedding, window, positions)(embedding)
    torch.testing.assert_close(some[positions], full[positions])
    assert some[~positions].eq(0).all() and full[~positions].gt(0).all()


@pytest.mark.parametrize("model", [patchcore, padim], ids=["patchcore", "padim"])
def test_feature_term_gradient_matches_finite_differences(model) -> None:  # noqa: ANN001
    network = model().double()
    try:
        scorer = build_scorer(network, IMAGENET, num_candidates=5)
        image, _ = defect_image()
        # a generic point: flat colour regions give exact ties in the backbone's max pooling, where the
        # derivative is one-sided
        noise = torch.rand(image.shape, generator=torch.Generator().manual_seed(1))
        image = (image + 0.01 * noise)[None].double()
        assert_feature_gradient_matches_finite_differences(scorer, network, image=image, step=1e-7)
    finally:
        network.float()


def test_padim_working_size_is_its_training_grid() -> None:
    scorer = build_scorer(padim(), IMAGENET, num_candidates=5)
    assert scorer.working_size((SIZE, SIZE)) == (SIZE, SIZE)
    assert scorer.working_size((96, 80)) == (SIZE, SIZE)


def test_faiss_patchcore_uses_the_faiss_bank_for_its_candidates() -> None:
    from anomalib_mlff.models.faiss_patchcore.torch_model import FaissPatchcoreModel  # noqa: PLC0415

    from tests.f2pad_fixtures import training_images  # noqa: PLC0415

    torch.manual_seed(0)
    model = FaissPatchcoreModel(layers=["layer2", "layer3"], backbone="resnet18", pre_trained=False).train()
    with torch.no_grad():
        model(IMAGENET.from_unit(training_images()[:6]))
    model.subsample_embedding(0.25)
    model.eval()
    scorer = build_scorer(model, IMAGENET, num_candidates=4)
    assert type(scorer).__name__ == "FaissPatchcoreScorer"
    image, _ = defect_image()
    with torch.no_grad():
        embedding = scorer.embed(image[None])
        scores = scorer.prepare(embedding, FeatureWindow.full(1, (SIZE, SIZE), image.device))(embedding)
        nearest, _ = model.bank.search(model.reshape_embedding(embedding), 1)
    torch.testing.assert_close(scores.flatten(), nearest.flatten(), rtol=1e-4, atol=1e-4)
