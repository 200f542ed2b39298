"""Whether to trust a refinement: two measures of how well the refined mask accounts for the model's scores.

Neither is in the paper, whose masks always replace the backbone's. Both compare the model's scores at the
observed image X, at R inpainted (everything F2PAD may call anomalous removed) and at the recovered normal
image X_N changed only inside the refined mask, all known at inference:

- :func:`explained`: the share of the score R's inpainting removes that the refined mask removes too. Low
  where the mask leaves the anomaly outside itself (too small, or misplaced).
- :func:`unexplained_area`: the share of the mask's pixels lying where removing the mask lowered no score.
  High where the mask covers far more than the anomaly the scores saw (a colour growth that flooded normal
  pixels): adding pixels can only raise :func:`explained`, so that share cannot catch a mask that grew too far.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F  # noqa: N812

#: A feature position counts as lowered where its score dropped by more than this share of the image's largest drop.
LOWERED_SHARE = 0.1


def explained(observed: torch.Tensor, start: torch.Tensor, recovered: torch.Tensor) -> torch.Tensor:
    """Share of the score drop ``observed - start`` that ``recovered`` achieves, in [0, 1]; ``(B,)``.

    ``observed``, ``start`` and ``recovered`` are the feature term L at the input X, at R inpainted and at the
    recovered normal image X_N. X_N may differ from X only inside the refined mask (the re-estimation frees
    exactly those pixels), so a share near 1 says the refined mask holds what made the region anomalous, and a
    share near 0 that the anomaly lies (mostly) outside it. Where inpainting lowers no score, nothing is to be
    explained and the share is 1.
    """
    drop = observed - start
    share = (observed - recovered) / drop.clamp_min(1e-12)
    return torch.where(drop > 0, share.clamp(0, 1), torch.ones_like(share))


def lowered(drop: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixels of a ``size`` image whose position's score ``drop`` (``(B, h, w)``) is large, ``(B, *size)`` bool.

    A position counts where its drop exceeds :data:`LOWERED_SHARE` of the image's largest drop; each covers its
    cell of the ``size`` image (nearest-neighbour upsampling of the grid).
    """
    largest = drop.flatten(1).amax(1).clamp_min(0).reshape(-1, 1, 1)
    positions = (drop > LOWERED_SHARE * largest) & (drop > 0)
    return F.interpolate(positions[:, None].float(), size=tuple(size), mode="nearest")[:, 0] > 0


def unexplained_area(mask: torch.Tensor, drop: torch.Tensor, judged: torch.Tensor) -> torch.Tensor:
    """Share of the pixels of ``mask`` (``(B, H, W)``) outside :func:`lowered` of ``drop`` (``(B, h, w)``); ``(B,)``.

    ``drop`` is each position's score at X minus its score at X_N changed only inside the mask. 1 where the mask
    lowered no score; 0 for an empty mask and for images not ``judged`` (``(B,)`` bool: those where inpainting R
    lowers no score, which :func:`explained` trusts too).
    """
    outside = (mask & ~lowered(drop, tuple(mask.shape[-2:]))).flatten(1).sum(1).to(drop.dtype)
    share = outside / mask.flatten(1).sum(1).clamp_min(1).to(drop.dtype)
    return torch.where(judged, share, torch.zeros_like(share))
