"""MLFF training losses (Tang et al., 2025, Eq. 4-8).

- feature loss (Eq. 4): class-balanced hypersphere classifier on the pseudo-Huber distance
  ``A = sqrt(||psi||^2 + 1) - 1`` to the centre (origin);
- score loss (Eq. 5): normal scores below ``gamma``; anomalous scores at least ``margin`` above
  the mean score of the same image's normal pixels;
- consistency loss (Eq. 6-7): per image, the row-wise softmax of pairwise score distances
  should match that of pairwise feature distances (KL), on patches of normal pixels.

Pixel masks ``(B, 1, H, W)`` at image resolution are brought to the feature resolution by max
pooling (:func:`masks_to_feature_size`): a feature cell is anomalous when any pixel it covers is.
Counts ``N1``/``N2`` (normal/anomalous) are over the whole batch. An empty class contributes 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from .anomaly_map import pseudo_huber_distance

__all__ = [
    "MLFFLoss",
    "consistency_loss",
    "feature_loss",
    "masks_to_feature_size",
    "score_loss",
]

#: A is clamped to at least this before log(1 - exp(-A)) (the loss is -log(A) near 0).
MIN_DISTANCE = 1e-6
#: Stand-in for -inf in masked softmax logits: exp underflows to exactly 0, gradients stay finite.
MASKED_LOGIT = -1e9


def masks_to_feature_size(masks: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """``(B, 1, H, W)`` {0,1} masks -> ``(B, 1, h, w)`` bool labels; a cell is anomalous if any pixel is."""
    return F.adaptive_max_pool2d(masks.float(), tuple(size)) > 0.5


def _safe_mean(total: Tensor, count: Tensor) -> Tensor:
    """``total / count``, 0 for an empty set."""
    return total / count.clamp_min(1)


def feature_loss(features: Tensor, labels: Tensor) -> Tensor:
    """Eq. 4: ``(1/2N1) sum_normal A - (1/2N2) sum_anomalous log(1 - exp(-A))``, in fp32.

    ``features`` ``(B, C, h, w)``, ``labels`` ``(B, 1, h, w)`` bool (True = anomalous).
    """
    distance = pseudo_huber_distance(features.float())
    normal, anomalous = ~labels, labels
    normal_term = _safe_mean((distance * normal).sum(), normal.sum())
    log_anomalous = torch.log(-torch.expm1(-distance.clamp_min(MIN_DISTANCE)))
    anomalous_term = _safe_mean((-log_anomalous * anomalous).sum(), anomalous.sum())
    return 0.5 * (normal_term + anomalous_term)


def score_loss(scores: Tensor, labels: Tensor, gamma: float, margin: float) -> Tensor:
    """Eq. 5: ``mean_normal relu(S - gamma) + mean_anomalous relu(margin - (S_a - S_ref))``.

    ``S_ref`` is the mean score of the same image's normal pixels (an image without normal
    pixels uses the batch's normal mean, and 0 if the batch has none).
    """
    scores = scores.float()
    normal, anomalous = (~labels).float(), labels.float()
    normal_term = _safe_mean((F.relu(scores - gamma) * normal).sum(), normal.sum())

    per_image_total, per_image_count = (scores * normal).sum(dim=(1, 2, 3)), normal.sum(dim=(1, 2, 3))
    batch_reference = _safe_mean(per_image_total.sum(), per_image_count.sum())
    reference = torch.where(per_image_count > 0, _safe_mean(per_image_total, per_image_count), batch_reference)
    gaps = scores - reference.view(-1, 1, 1, 1)
    anomalous_term = _safe_mean((F.relu(margin - gaps) * anomalous).sum(), anomalous.sum())
    return normal_term + anomalous_term


def consistency_loss(features: Tensor, scores: Tensor, labels: Tensor, patch_size: int) -> Tensor:
    """Eq. 6-7: ``(1/B) sum_images (1/K) sum_i KL(softmax(Q_i) || softmax(P_i))``.

    Features and scores are average-pooled into ``patch_size`` x ``patch_size`` patches (cells of
    the feature map, capped by its size; a ragged border is dropped); only patches without anomalous cells take part,
    as rows (``K`` = their number) and as softmax columns. ``P``/``Q``: pairwise Euclidean
    distances of patch features / patch scores. Images without normal patches add 0.
    """
    patch_size = min(patch_size, *features.shape[-2:])
    patch_features = F.avg_pool2d(features.float(), patch_size).flatten(2).transpose(1, 2)  # (B, K, C)
    patch_scores = F.avg_pool2d(scores.float(), patch_size).flatten(2).transpose(1, 2)  # (B, K, 1)
    normal = ~(F.max_pool2d(labels.float(), patch_size).flatten(1) > 0.5)  # (B, K)

    def log_rows(points: Tensor) -> Tensor:
        distances = torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist")
        return torch.log_softmax(distances.masked_fill(~normal.unsqueeze(1), MASKED_LOGIT), dim=-1)

    log_q, log_p = log_rows(patch_scores), log_rows(patch_features)
    row_kl = (log_q.exp() * (log_q - log_p)).sum(dim=-1)  # (B, K); masked columns have weight 0
    per_image = _safe_mean((row_kl * normal).sum(dim=1), normal.sum(dim=1))
    return per_image.mean()


class MLFFLoss(nn.Module):
    """Weighted sum ``alpha L_f + beta L_s + xi L_fs`` (Eq. 8); a weight of 0 skips its term.

    Args:
        feature_weight, score_weight, consistency_weight: alpha, beta, xi (paper: 1, 1, 1).
        gamma: score threshold for normal pixels (paper: 2.5).
        margin: required score gap of anomalous over normal pixels, lambda (paper: 5).
        consistency_patch_size: side, in feature cells, of the patches of the consistency loss
            (4 = 16x16 image pixels on a stride-4 feature map).
    """

    def __init__(
        self,
        feature_weight: float = 1.0,
        score_weight: float = 1.0,
        consistency_weight: float = 1.0,
        gamma: float = 2.5,
        margin: float = 5.0,
        consistency_patch_size: int = 4,
    ) -> None:
        super().__init__()
        weights = {
            "feature_weight": feature_weight,
            "score_weight": score_weight,
            "consistency_weight": consistency_weight,
        }
        for name, value in weights.items():
            if not value >= 0:
                msg = f"{name} must be >= 0, got {name}={value}."
                raise ValueError(msg)
        if not any(weights.values()):
            msg = "At least one of feature_weight, score_weight, consistency_weight must be > 0."
            raise ValueError(msg)
        if not margin >= 0:
            msg = f"margin must be >= 0, got margin={margin}."
            raise ValueError(msg)
        if not isinstance(consistency_patch_size, int) or consistency_patch_size < 1:
            msg = f"consistency_patch_size must be a positive integer, got {consistency_patch_size!r}."
            raise ValueError(msg)
        self.feature_weight = float(feature_weight)
        self.score_weight = float(score_weight)
        self.consistency_weight = float(consistency_weight)
        self.gamma = float(gamma)
        self.margin = float(margin)
        self.consistency_patch_size = consistency_patch_size

    def _labels(self, features: Tensor, masks: Tensor) -> Tensor:
        if masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[0] != features.shape[0]:
            msg = f"masks must be (B, 1, H, W) with B={features.shape[0]}, got masks of shape {tuple(masks.shape)}."
            raise ValueError(msg)
        if masks.shape[-2] < features.shape[-2] or masks.shape[-1] < features.shape[-1]:
            msg = f"masks {tuple(masks.shape[-2:])} are smaller than the feature map {tuple(features.shape[-2:])}."
            raise ValueError(msg)
        return masks_to_feature_size(masks, features.shape[-2:])

    def forward(self, features: Tensor, scores: Tensor | None, masks: Tensor) -> dict[str, Tensor]:
        """Return ``loss`` (weighted total), ``feature_loss``, ``score_loss`` and ``consistency_loss``."""
        if features.ndim != 4:
            msg = f"features must be (B, C, h, w), got shape {tuple(features.shape)}."
            raise ValueError(msg)
        if scores is not None and (scores.shape[1] != 1 or scores.shape[-2:] != features.shape[-2:]):
            msg = f"scores must be (B, 1, h, w) like features {tuple(features.shape)}, got {tuple(scores.shape)}."
            raise ValueError(msg)
        if scores is None and not self.feature_weight:
            msg = "Without scores (no score head) feature_weight must be > 0, otherwise there is nothing to optimise."
            raise ValueError(msg)
        labels = self._labels(features, masks)
        zero = features.new_zeros((), dtype=torch.float32)
        with_scores = scores is not None
        terms = {
            "feature_loss": feature_loss(features, labels) if self.feature_weight else zero,
            "score_loss": (
                score_loss(scores, labels, self.gamma, self.margin) if with_scores and self.score_weight else zero
            ),
            "consistency_loss": (
                consistency_loss(features, scores, labels, self.consistency_patch_size)
                if with_scores and self.consistency_weight
                else zero
            ),
        }
        total = (
            self.feature_weight * terms["feature_loss"]
            + self.score_weight * terms["score_loss"]
            + self.consistency_weight * terms["consistency_loss"]
        )
        return {"loss": total, **terms}
