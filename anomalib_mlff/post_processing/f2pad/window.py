"""Where F2PAD works: the dilated mask, a common crop around it, and the feature positions it touches.

Only pixels inside the dilated initial mask are optimised (paper, III-E2), so only features whose
receptive field reaches them change. Each image of a batch gets a crop of one common size around its
mask (so the batch stays one tensor) at a pixel offset that is a multiple of the backbone's largest
stride: the crop's feature grid then coincides with the full image's, and position ``(i, j)`` of a
crop is position ``(top / stride + i, left / stride + j)`` of the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F  # noqa: N812


def dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of ``(B, H, W)`` masks with a square of side ``2 * radius + 1``."""
    if radius <= 0:
        return masks.bool()
    grown = F.max_pool2d(masks[:, None].float(), kernel_size=2 * radius + 1, stride=1, padding=radius)
    return grown[:, 0] > 0


@dataclass(frozen=True)
class FeatureWindow:
    """Same-size crops of a batch of images.

    ``offsets`` holds each crop's (top, left) pixel offset, ``size`` the crop's (height, width) and
    ``image_size`` the full images' size, all in pixels.
    """

    offsets: torch.Tensor
    size: tuple[int, int]
    image_size: tuple[int, int]

    @classmethod
    def full(cls, batch_size: int, image_size: tuple[int, int], device: torch.device) -> FeatureWindow:
        """The whole image for every item."""
        return cls(torch.zeros(batch_size, 2, dtype=torch.long, device=device), tuple(image_size), tuple(image_size))

    @classmethod
    def around(cls, regions: torch.Tensor, margin: int, alignment: int) -> FeatureWindow:
        """Smallest common crop holding every region's bounding box plus ``margin`` pixels of context.

        Falls back to the whole image where the image size is not a multiple of ``alignment`` (its
        feature grid would then not be a sub-grid of the crop's) or the crop would cover it anyway.
        """
        batch_size, height, width = regions.shape
        full = cls.full(batch_size, (height, width), regions.device)
        if height % alignment or width % alignment:
            return full
        rows, cols = regions.any(2), regions.any(1)
        firsts_lasts = torch.stack([_extent(rows), _extent(cols)], 1)  # (B, 2 axes, [first, last])
        # aligning an offset down costs up to `alignment - 1` pixels, hence the extra `alignment`
        spans = firsts_lasts[..., 1] - firsts_lasts[..., 0] + 1 + 2 * margin + alignment
        size = [
            min(_round_up(int(spans[:, axis].max()), alignment), extent)
            for axis, extent in enumerate((height, width))
        ]
        if size == [height, width]:
            return full
        limits = torch.tensor([height - size[0], width - size[1]], device=regions.device)
        starts = (firsts_lasts[..., 0] - margin).clamp(min=0) // alignment * alignment
        offsets = torch.minimum(starts, limits)
        return cls(offsets, (size[0], size[1]), (height, width))

    def crop(self, tensor: torch.Tensor) -> torch.Tensor:
        """Cut each item's crop out of a ``(B, ..., H, W)`` tensor."""
        if tuple(self.size) == tuple(self.image_size):
            return tensor
        height, width = self.size
        return torch.stack(
            [
                item[..., top : top + height, left : left + width]
                for item, (top, left) in zip(tensor, self.offsets.tolist(), strict=True)
            ]
        )

    def paste(self, crops: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        """Write each crop back into a copy of the full-size ``into``."""
        if tuple(self.size) == tuple(self.image_size):
            return crops.clone()
        height, width = self.size
        out = into.clone()
        for index, (top, left) in enumerate(self.offsets.tolist()):
            out[index, ..., top : top + height, left : left + width] = crops[index]
        return out

    def grid_offsets(self, stride: int) -> torch.Tensor:
        """Each crop's (row, column) offset on a feature grid of the given stride."""
        return self.offsets // stride


def positions_touched(regions: torch.Tensor, stride: int, reach: int) -> torch.Tensor:
    """Feature positions (``(B, H / stride, W / stride)``) within ``reach`` pixels of a region pixel."""
    grown = dilate(regions, reach)
    return F.max_pool2d(grown[:, None].float(), kernel_size=stride, stride=stride, ceil_mode=True)[:, 0] > 0


def _extent(occupied: torch.Tensor) -> torch.Tensor:
    """(first, last) occupied index per row of a ``(B, N)`` boolean tensor; (0, N - 1) when empty."""
    length = occupied.shape[1]
    index = torch.arange(length, device=occupied.device).expand_as(occupied)
    first = torch.where(occupied, index, length).amin(1)
    last = torch.where(occupied, index, -1).amax(1)
    empty = ~occupied.any(1)
    first = torch.where(empty, 0, first)
    last = torch.where(empty, length - 1, last)
    return torch.stack([first, last], 1)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
