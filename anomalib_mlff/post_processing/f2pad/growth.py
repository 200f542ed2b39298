"""Growing the refined mask into connected pixels whose colour the pixel prior rejects.

F2PAD optimises X_N only inside R, the dilated initial mask, and there the feature term holds X_N to its
surroundings. Where the coarse mask covers part of a defect of a foreign colour (a tint, a stain), the rest of the
defect lies outside R or is held at the defect's colour, and the refined mask shrinks to the covered part
(a blue tint on grey brick keeps its colour in X_N although its pixels cost 26 under the prior against 0.5 for
normal ones). The prior already knows those pixels are not normal: every pixel of a connected region of such
colour outliers that touches the refined mask joins it, within R plus ``growth_margin`` pixels (and the crop
F2PAD works on), so that a colour the prior rejects everywhere cannot flood the image.
"""

from __future__ import annotations

import numpy as np
import torch
from kornia.filters import median_blur
from scipy import ndimage

from .prior import PixelPrior


def colour_cost(images: torch.Tensor, prior: PixelPrior, median_size: int) -> torch.Tensor:
    """The prior's cost of each pixel of ``(B, C, H, W)`` images, median-filtered like |A|: ``(B, H, W)``."""
    with torch.no_grad():
        cost = prior(images)
    return cost if median_size == 1 else median_blur(cost[:, None], median_size)[:, 0]


def connected_to(mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``mask`` plus every 8-connected region of ``candidates`` that touches it, ``(B, H, W)`` bool."""
    grown = []
    for seed, extra in zip(mask.cpu().numpy(), candidates.cpu().numpy(), strict=True):
        labels, _ = ndimage.label(seed | extra, structure=np.ones((3, 3), dtype=bool))
        touched = np.unique(labels[seed])
        grown.append(np.isin(labels, touched[touched > 0]))
    return torch.from_numpy(np.stack(grown)).to(mask.device)


def grow_into_colour_outliers(
    mask: torch.Tensor,
    magnitude: torch.Tensor,
    images: torch.Tensor,
    prior: PixelPrior,
    cost_threshold: float,
    mask_threshold: float,
    median_size: int,
    within: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grown mask and its |A| map, ``(B, H, W)`` each; growth only reaches pixels of ``within`` (``(B, H, W)``).

    Grown pixels get ``mask_threshold * cost / cost_threshold`` where that exceeds |A|, so the map stays above the
    mask threshold exactly on the mask (anomalib's convention that the map's 0.5 level is the mask).
    """
    cost = colour_cost(images, prior, median_size)
    outliers = cost > cost_threshold
    grown = connected_to(mask, outliers if within is None else outliers & within)
    added = grown & ~mask
    magnitude = torch.where(added, torch.maximum(magnitude, mask_threshold * cost / cost_threshold), magnitude)
    return grown, magnitude
