"""F2PAD's differentiable scorer for MLFF: the network's own per-pixel scores.

MLFF is trained to output anomaly scores directly (the score head's ``S``, or the pseudo-Huber
distance of ``psi`` to the centre without the head), so the scorer's "embedding" is that one-channel
score map at layer1's resolution and the per-position score is its value, floored at 0: the score
loss only asks normal pixels to stay below ``gamma``, so a negative score is already normal and
pushing it further down would not make the image more normal.

STLNet's texture branch quantises with image-wide statistics (TEM) and pools over whole-image
pyramid regions (PTFEM), so a crop would change every feature: the scorer asks F2PAD for
whole-image windows (``crop_allowed = False``). Registered with F2PAD on import
(``anomalib_mlff.models.mlff`` imports this).
"""

from __future__ import annotations

import torch

from anomalib_mlff.post_processing.f2pad.scorers import (
    DifferentiableScorer,
    PositionScores,
    register_scorer,
)
from anomalib_mlff.post_processing.f2pad.window import FeatureWindow

from .anomaly_map import pseudo_huber_distance
from .torch_model import MLFFModel

__all__ = ["MLFFScorer"]


@register_scorer(MLFFModel)
class MLFFScorer(DifferentiableScorer):
    """MLFF's per-pixel scores (layer1's grid), floored at 0, over whole images."""

    crop_allowed = False

    def _embed(self, normalised: torch.Tensor) -> torch.Tensor:
        psi, scores = self.model.extract_features(normalised)
        return scores if scores is not None else pseudo_huber_distance(psi)

    def prepare(
        self, initial_embedding: torch.Tensor, window: FeatureWindow, positions: torch.Tensor | None = None
    ) -> PositionScores:
        """Nothing to fix at the initial estimate: the score is the network's output."""
        del initial_embedding, window, positions

        def scores(embedding: torch.Tensor) -> torch.Tensor:
            return embedding[:, 0].clamp_min(0)

        return scores

