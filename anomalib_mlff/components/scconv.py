"""Self-calibrated convolution (SCConv, Liu et al., CVPR 2020), MLFF's semantic-branch block.

The calibration branch looks at an average-pooled copy of the input (rate ``r``), so each
output position sees context ``r`` times wider, while the output keeps the input's H x W:

    gate = sigmoid(x + up(K2(avgpool_r(x))))
    y    = K4(K3(x) * gate)

K2, K3, K4 are 3x3 Conv-BN. ``up`` is nearest-neighbour resizing back to H x W.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

__all__ = ["SelfCalibratedConv"]


def _conv_bn(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))


class SelfCalibratedConv(nn.Module):
    """SCConv block with ``channels`` in and out; needs H and W of at least ``pooling_rate``."""

    def __init__(self, channels: int, pooling_rate: int = 4) -> None:
        super().__init__()
        if pooling_rate < 1:
            msg = f"pooling_rate must be >= 1, got pooling_rate={pooling_rate}."
            raise ValueError(msg)
        self.pooling_rate = pooling_rate
        self.k2 = _conv_bn(channels)
        self.k3 = _conv_bn(channels)
        self.k4 = _conv_bn(channels)

    def forward(self, features: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        height, width = features.shape[-2:]
        if height < self.pooling_rate or width < self.pooling_rate:
            msg = (
                f"SCConv needs feature maps of at least {self.pooling_rate}x{self.pooling_rate} "
                f"(pooling_rate), got {height}x{width}; use larger input images."
            )
            raise ValueError(msg)
        context = self.k2(F.avg_pool2d(features, self.pooling_rate, self.pooling_rate))
        gate = torch.sigmoid(features + F.interpolate(context, size=(height, width), mode="nearest"))
        return self.k4(self.k3(features) * gate)
