"""MLFF anomaly maps (paper Eq. 9): per-pixel scores, bilinearly upsampled to the image size.

With the score head, a pixel's score is the head's output S(X_i). Without it (the paper's
ablation baseline) the score is the pseudo-Huber distance of the feature to the centre (origin),
the same ``A`` the feature loss uses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

__all__ = ["AnomalyMapGenerator", "pseudo_huber_distance"]


def pseudo_huber_distance(features: Tensor) -> Tensor:
    """``(B, C, h, w)`` -> ``(B, 1, h, w)``: ``A = sqrt(||psi||^2 + 1) - 1``.

    Written as ``||psi||^2 / (sqrt(||psi||^2 + 1) + 1)`` (algebraically equal) to keep precision
    for small distances, where ``sqrt(1 + x) - 1`` cancels.
    """
    squared = features.pow(2).sum(dim=1, keepdim=True)
    return squared / (torch.sqrt(squared + 1) + 1)


class AnomalyMapGenerator(nn.Module):
    """Upsample ``(B, 1, h, w)`` pixel scores to ``image_size`` (bilinear, ``align_corners=False``)."""

    def forward(self, pixel_scores: Tensor, image_size: tuple[int, int] | torch.Size) -> Tensor:
        """Return the ``(B, 1, H, W)`` anomaly map."""
        return F.interpolate(pixel_scores, size=tuple(image_size), mode="bilinear", align_corners=False)
