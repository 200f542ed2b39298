"""AMC: anomaly map compensation (MFFA).

Each branch's patch scores are resized to the image (bilinear); the final map is their
element-wise product (``M_final = M_NNS x M_gaussian``), smoothed by a Gaussian filter (sigma 4);
the image score is the map's maximum. With one branch switched off (the paper's Table 1
ablation) that branch's map alone is smoothed.
"""

from __future__ import annotations

import torch
from kornia.filters import gaussian_blur2d
from torch import Tensor, nn

from .lgffp import resize_to

__all__ = ["AnomalyMapGenerator", "blur_kernel_size"]


def blur_kernel_size(sigma: float) -> int:
    """Odd kernel covering +-4 sigma (anomalib's convention for its anomaly-map blur)."""
    return 2 * int(4.0 * sigma + 0.5) + 1


class AnomalyMapGenerator(nn.Module):
    """Combine branch maps into the final anomaly map.

    Args:
        sigma: standard deviation of the Gaussian smoothing in pixels (paper: 4); 0 disables it.
    """

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        if sigma < 0:
            msg = f"blur_sigma must be >= 0, got blur_sigma={sigma}."
            raise ValueError(msg)
        self.sigma = float(sigma)

    @staticmethod
    def upsample(patch_scores: Tensor, image_size: tuple[int, int] | torch.Size) -> Tensor:
        """``(B, 1, h, w)`` patch scores -> ``(B, 1, H, W)`` branch map."""
        return resize_to(patch_scores, image_size)

    def smooth(self, anomaly_map: Tensor) -> Tensor:
        """Gaussian filter (reflecting borders) with the configured sigma; the kernel fits the map."""
        if self.sigma == 0:
            return anomaly_map
        size = min(blur_kernel_size(self.sigma), 2 * min(anomaly_map.shape[-2:]) - 1)
        return gaussian_blur2d(anomaly_map, (size, size), (self.sigma, self.sigma), border_type="reflect")

    def forward(self, branch_maps: list[Tensor]) -> Tensor:
        """Element-wise product of the image-size branch maps, smoothed: ``(B, 1, H, W)``."""
        combined = branch_maps[0]
        for branch_map in branch_maps[1:]:
            combined = combined * branch_map
        return self.smooth(combined)
