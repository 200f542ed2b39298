"""F2PAD's objective (paper Eq. 3 / 12), one value per image of a batch of window crops.

    J(X_N) = L(X_N) / g0  +  lambda * sum_R log(1 + |A| / eps)  +  mu_p * sum_R prior(X_N)  +  mu_tv * TV(X_N)

with A = X - X_N the anomalous part, R the pixels being optimised, L the model's feature-level
anomaly scores summed over the feature positions those pixels reach, |A| the per-pixel channel norm
(the LOG penalty on pixel groups, as in the paper's reference [43]) and TV the anisotropic total
variation. g0 is the median over R of the per-pixel gradient norm of L at the initial estimate
(:func:`calibrate_feature_scale`): the pixel-level weights then compare with a feature gradient of
1 whatever the backbone, its score (distance or squared Mahalanobis distance) and its initialisation.
The paper's objective has no g0 (``scale_feature_term=False`` keeps g0 = 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from kornia.losses import total_variation

from .prior import PixelPrior
from .scorers import DifferentiableScorer, PositionScores


def channel_norm(images: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Per-pixel L2 norm over the channels of ``(B, C, H, W)``, with gradient 0 where it is 0 (as ``vector_norm``).

    ``torch.linalg.vector_norm(images, dim=1)`` gives the same values but takes ~100x longer on this CPU build
    (5 ms for one 256 px image against 0.04 ms), and F2PAD calls it several times per iteration.
    """
    squared = images.square().sum(1, keepdim=keepdim)
    positive = squared > 0
    return torch.where(positive, torch.where(positive, squared, 1).sqrt(), 0)  # no inf gradient from sqrt(0)


def log_sparsity(anomalous_part: torch.Tensor, region: torch.Tensor, eps: float) -> torch.Tensor:
    """LOG penalty ``sum log(1 + |A_ij| / eps)`` over the region, ``|A_ij|`` the channel norm; ``(B,)``."""
    magnitude = channel_norm(anomalous_part)
    return (torch.log1p(magnitude / eps) * region).flatten(1).sum(1)


def smoothness(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of each image, summed over channels; ``(B,)``."""
    return total_variation(images, reduction="sum").sum(1)


class ObjectiveTerms(NamedTuple):
    """The objective's terms per image, each ``(B,)``, already weighted."""

    feature: torch.Tensor
    sparsity: torch.Tensor
    prior: torch.Tensor
    smoothness: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        """Their sum, the value minimised."""
        return self.feature + self.sparsity + self.prior + self.smoothness


@dataclass
class Objective:
    """J(X_N) for one batch of window crops.

    Attributes:
        scorer: the model's differentiable scorer.
        scores: its per-position score function, prepared at the initial estimate.
        observed: the input crops X, ``(B, C, h, w)`` in [0, 1].
        region: pixels being optimised, ``(B, h, w)`` bool.
        positions: feature positions whose score can change, ``(B, h / stride, w / stride)`` bool.
        feature_scale: each image's feature-gradient scale g0, ``(B,)``.
        sparsity_weight: lambda per image, ``(B,)``; zero for the re-estimation.
        eps: LOG penalty scale.
        prior: fitted pixel prior, or ``None`` to leave the term out.
        prior_weight: mu_p.
        smoothness_weight: mu_tv.
    """

    scorer: DifferentiableScorer
    scores: PositionScores
    observed: torch.Tensor
    region: torch.Tensor
    positions: torch.Tensor
    feature_scale: torch.Tensor
    sparsity_weight: torch.Tensor
    eps: float
    prior: PixelPrior | None
    prior_weight: float
    smoothness_weight: float

    def terms(self, normal: torch.Tensor) -> ObjectiveTerms:
        """Weighted terms at the normal-image estimate ``normal``."""
        region = self.region.to(normal.dtype)
        position_scores = self.scores(self.scorer.embed(normal))
        feature = (position_scores * self.positions).flatten(1).sum(1) / self.feature_scale
        sparsity = self.sparsity_weight * log_sparsity(self.observed - normal, region, self.eps)
        if self.prior is None or self.prior_weight == 0:
            prior = torch.zeros_like(feature)
        else:
            prior = self.prior_weight * (self.prior(normal) * region).flatten(1).sum(1)
        tv = self.smoothness_weight * smoothness(normal) if self.smoothness_weight else torch.zeros_like(feature)
        return ObjectiveTerms(feature, sparsity, prior, tv)

    def __call__(self, normal: torch.Tensor) -> torch.Tensor:
        """J per image, ``(B,)``."""
        return self.terms(normal).total

    def select(self, rows: torch.Tensor) -> Objective:
        """J of the images ``rows`` alone: the backbone then runs on those images only.

        The score function was prepared for the whole batch, so the selected images' embedding is put back at
        their places in a batch of zeros before scoring, and the other images' scores are dropped.
        """
        scores, batch = self.scores, self.observed.shape[0]

        def selected(embedding: torch.Tensor) -> torch.Tensor:
            whole = embedding.new_zeros((batch, *embedding.shape[1:])).index_copy(0, rows, embedding)
            return scores(whole)[rows]

        return replace(self._per_image(lambda tensor: tensor[rows]), scores=selected)

    def repeat(self, times: int) -> Objective:
        """J of a batch of ``times`` stacked copies of the images (``torch.cat`` order), e.g. one per start."""
        scores, batch = self.scores, self.observed.shape[0]

        def repeated(embedding: torch.Tensor) -> torch.Tensor:
            return torch.cat([scores(part) for part in embedding.split(batch)])

        tiled = self._per_image(lambda tensor: tensor.repeat(times, *[1] * (tensor.ndim - 1)))
        return replace(tiled, scores=repeated)

    def _per_image(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> Objective:
        """This objective with ``transform`` applied to each per-image tensor."""
        return replace(self, **{name: transform(getattr(self, name)) for name in _PER_IMAGE})

    def feature_score(self, images: torch.Tensor) -> torch.Tensor:
        """The unscaled feature term L (the model's scores summed over the touched positions), ``(B,)``."""
        return self.position_scores(images).flatten(1).sum(1)

    def position_scores(self, images: torch.Tensor) -> torch.Tensor:
        """The model's scores at the touched positions (0 elsewhere), ``(B, h, w)`` on the scorer's grid."""
        with torch.no_grad():
            return self.scores(self.scorer.embed(images)) * self.positions


#: The fields of :class:`Objective` that hold one entry per image.
_PER_IMAGE = ("observed", "region", "positions", "feature_scale", "sparsity_weight")


class NonFiniteError(ValueError):
    """An image, anomaly map or gradient holds NaN or inf; ``items`` are the batch indices concerned."""

    def __init__(self, what: str, items: list[int]) -> None:
        self.what, self.items = what, items
        super().__init__(f"F2PAD: {what} of image(s) {items} hold NaN or inf.")


def median_feature_gradient(objective: Objective, images: torch.Tensor) -> torch.Tensor:
    """Median over the region of the per-pixel gradient norm of the unscaled feature term at ``images``; ``(B,)``."""
    unscaled = replace(objective, feature_scale=torch.ones_like(objective.feature_scale))
    estimate = images.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(unscaled.terms(estimate).feature.sum(), estimate)
    norms = channel_norm(gradient)
    medians = [
        item[region].median() if region.any() else item.new_tensor(0.0)
        for item, region in zip(norms, objective.region, strict=True)
    ]
    return torch.stack(medians)


#: g0 at the start counts as collapsed below this share of g0 at the observed image.
COLLAPSED_SCALE = 0.01


def calibrate_feature_scale(objective: Objective, start: torch.Tensor) -> torch.Tensor:
    """g0 per image, ``(B,)``: the median feature-gradient norm over the region at ``start``.

    Where inpainting already made the region's scores flat (a model whose scores are floored at 0,
    say), that median is (near) zero and ``L / g0`` would become a barrier that drowns every other
    term as soon as a score rises again. There g0 falls back to the same median at the observed image,
    where the anomaly gives the feature term its gradient; where that is zero too, to 1 (the feature
    term is then flat around both points and its scale does not matter).
    """
    at_start = median_feature_gradient(objective, start)
    at_observed = median_feature_gradient(objective, objective.observed)
    scale = torch.where(at_start >= COLLAPSED_SCALE * at_observed, at_start, at_observed)
    if not torch.isfinite(scale).all():
        raise NonFiniteError("the feature gradients", torch.nonzero(~torch.isfinite(scale)).flatten().tolist())
    return torch.where(scale > 0, scale, torch.ones_like(scale))
