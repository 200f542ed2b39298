"""MLFF losses (Eq. 4-8) against numbers computed by hand from plain formulas."""

from __future__ import annotations

import math

import pytest
import torch

from anomalib_mlff.models.mlff.loss import MLFFLoss, consistency_loss, feature_loss, masks_to_feature_size, score_loss


def huber(*vector: float) -> float:
    return math.sqrt(sum(v * v for v in vector) + 1) - 1


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def kl(q: list[float], p: list[float]) -> float:
    return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True))


# Three pixels in one row: (0, 0) normal, (3, 4) normal, (1, 0) anomalous.
FEATURES = torch.tensor([[[[0.0, 3.0, 1.0]], [[0.0, 4.0, 0.0]]]])
LABELS = torch.tensor([[[[False, False, True]]]])


def test_feature_loss_by_hand() -> None:
    normal_mean = (huber(0, 0) + huber(3, 4)) / 2
    anomalous_mean = -math.log(1 - math.exp(-huber(1, 0)))
    expected = 0.5 * normal_mean + 0.5 * anomalous_mean
    assert feature_loss(FEATURES, LABELS).item() == pytest.approx(expected, rel=1e-5)


def test_score_loss_by_hand() -> None:
    # image 0: normal scores 1 and 4, anomalous 6 -> reference (1+4)/2 = 2.5
    # image 1: normal score 0, anomalous 9 and 2 -> reference 0
    scores = torch.tensor([[[[1.0, 4.0, 6.0]]], [[[0.0, 9.0, 2.0]]]])
    labels = torch.tensor([[[[False, False, True]]], [[[False, True, True]]]])
    gamma, margin = 2.5, 5.0
    normal = [max(0, s - gamma) for s in (1.0, 4.0, 0.0)]
    anomalous = [max(0, margin - (6.0 - 2.5)), max(0, margin - (9.0 - 0.0)), max(0, margin - (2.0 - 0.0))]
    expected = sum(normal) / 3 + sum(anomalous) / 3
    assert score_loss(scores, labels, gamma, margin).item() == pytest.approx(expected)


def test_score_loss_image_without_normal_pixels_uses_the_batch_normal_mean() -> None:
    scores = torch.tensor([[[[1.0, 3.0]]], [[[4.0, 5.0]]]])
    labels = torch.tensor([[[[False, False]]], [[[True, True]]]])
    expected = 0.5 * (0 + 0.5) + 0.5 * (max(0, 5 - (4 - 2)) + max(0, 5 - (5 - 2)))
    assert score_loss(scores, labels, 2.5, 5.0).item() == pytest.approx(expected)


def test_consistency_loss_by_hand_on_normal_patches_only() -> None:
    # patch_size 1: every cell is a patch. Cells 0-2 normal, cell 3 anomalous (ignored).
    features = torch.tensor([[[[0.0, 1.0, 3.0, 50.0]]]])  # 1 channel
    scores = torch.tensor([[[[0.0, 2.0, 0.5, -7.0]]]])
    labels = torch.tensor([[[[False, False, False, True]]]])
    f, s = [0.0, 1.0, 3.0], [0.0, 2.0, 0.5]
    rows = []
    for i in range(3):
        p = softmax([abs(f[i] - f[j]) for j in range(3)])
        q = softmax([abs(s[i] - s[j]) for j in range(3)])
        rows.append(kl(q, p))
    image_loss = sum(rows) / 3
    # A second image without normal patches adds 0 to the batch sum; the mean is over the 2 images.
    features = torch.cat([features, features])
    scores = torch.cat([scores, scores])
    labels = torch.cat([labels, torch.ones_like(labels)])
    assert consistency_loss(features, scores, labels, patch_size=1).item() == pytest.approx(image_loss / 2, rel=1e-5)


def test_consistency_patches_average_features_and_drop_touched_patches() -> None:
    features = torch.arange(16.0).view(1, 1, 4, 4)
    scores = -torch.arange(16.0).view(1, 1, 4, 4) / 4
    labels = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    labels[0, 0, 3, 3] = True  # one anomalous cell spoils the bottom-right 2x2 patch
    # 2x2 patches; patch means: features 2.5, 4.5, 10.5 (normal), scores the same / -4
    f = [2.5, 4.5, 10.5]
    s = [-v / 4 for v in f]
    expected = 0.0
    for i in range(3):
        expected += kl(softmax([abs(s[i] - s[j]) for j in range(3)]), softmax([abs(f[i] - f[j]) for j in range(3)]))
    expected /= 3
    assert consistency_loss(features, scores, labels, patch_size=2).item() == pytest.approx(expected, rel=1e-5)


def test_masks_are_max_pooled_to_the_feature_grid() -> None:
    masks = torch.zeros(1, 1, 8, 8)
    masks[0, 0, 5, 2] = 1
    labels = masks_to_feature_size(masks, (4, 4))
    expected = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    expected[0, 0, 2, 1] = True
    assert torch.equal(labels, expected)


def test_total_is_the_weighted_sum_and_zero_weights_disable_terms() -> None:
    features = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    scores = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, :, 4:12, 8:20] = 1
    full = MLFFLoss(consistency_patch_size=2)(features, scores, masks)
    assert set(full) == {"loss", "feature_loss", "score_loss", "consistency_loss"}
    assert all(value.item() > 0 for value in full.values())
    weighted = MLFFLoss(feature_weight=2.0, score_weight=0.5, consistency_weight=0.0, consistency_patch_size=2)
    parts = weighted(features, scores, masks)
    assert parts["consistency_loss"].item() == 0
    expected = 2.0 * full["feature_loss"] + 0.5 * full["score_loss"]
    assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    no_head = MLFFLoss()(features, None, masks)
    assert no_head["score_loss"].item() == 0 and no_head["consistency_loss"].item() == 0
    assert no_head["loss"].item() == pytest.approx(full["feature_loss"].item(), rel=1e-6)


@pytest.mark.parametrize("anomalous", [0.0, 1.0])
def test_batches_with_one_class_only_are_finite(anomalous: float) -> None:
    features = torch.zeros(2, 4, 8, 8, requires_grad=True)  # A = 0: the log term's worst case
    scores = torch.zeros(2, 1, 8, 8, requires_grad=True)
    masks = torch.full((2, 1, 32, 32), anomalous)
    losses = MLFFLoss()(features, scores, masks)
    losses["loss"].backward()
    assert all(torch.isfinite(value) for value in losses.values())
    assert torch.isfinite(features.grad).all() and torch.isfinite(scores.grad).all()
    if anomalous:
        assert losses["consistency_loss"].item() == 0  # no normal patch


def test_gradients_are_finite_and_reach_both_inputs() -> None:
    features = torch.randn(2, 4, 8, 8, requires_grad=True)
    scores = torch.randn(2, 1, 8, 8, requires_grad=True)
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, 2:5, 3:6] = 1
    MLFFLoss(consistency_patch_size=2)(features, scores, masks)["loss"].backward()
    for grad in (features.grad, scores.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"feature_weight": -1.0}, "feature_weight"),
        ({"feature_weight": 0.0, "score_weight": 0.0, "consistency_weight": 0.0}, "weight"),
        ({"margin": -1.0}, "margin"),
        ({"consistency_patch_size": 0}, "consistency_patch_size"),
    ],
)
def test_bad_settings_are_rejected(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        MLFFLoss(**kwargs)


def test_bad_masks_are_rejected() -> None:
    features, scores = torch.randn(2, 4, 8, 8), torch.randn(2, 1, 8, 8)
    for masks in (torch.zeros(2, 32, 32), torch.zeros(3, 1, 32, 32), torch.zeros(2, 3, 32, 32)):
        with pytest.raises(ValueError, match="masks"):
            MLFFLoss()(features, scores, masks)
