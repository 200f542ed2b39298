"""Map images between [0, 1] pixel values and the pre-processor's normalised space.

Pseudo anomalies (and anything that reasons about valid pixel values) work on [0, 1] images,
while anomalib's pre-processor hands models ImageNet-normalised ones. :class:`PixelRange`
reads the ``Normalize`` step out of a pre-processor transform and converts both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2


@dataclass(frozen=True)
class PixelRange:
    """Per-channel affine map ``normalised = (unit - mean) / std``; identity without ``Normalize``."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @classmethod
    def from_transform(cls, transform: v2.Transform | None) -> PixelRange:
        """Find the (last) ``Normalize`` in a transform or ``Compose``; identity if there is none."""
        found: v2.Normalize | None = None
        stack = [transform] if transform is not None else []
        while stack:
            step = stack.pop(0)
            if isinstance(step, v2.Normalize):
                found = step
            stack.extend(getattr(step, "transforms", []))
        if found is None:
            return cls()
        return cls(mean=tuple(float(m) for m in found.mean), std=tuple(float(s) for s in found.std))

    @classmethod
    def of_model(cls, module: object) -> PixelRange:
        """How an anomalib module's pre-processor normalises pixels (identity without one)."""
        pre_processor = getattr(module, "pre_processor", None)
        return cls.from_transform(getattr(pre_processor, "transform", None))

    def _stats(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1) if images.ndim == 4 else (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(shape)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(shape)
        return mean, std

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> [0, 1] pixel values."""
        mean, std = self._stats(images)
        return images * std + mean

    def from_unit(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixel values -> normalised images."""
        mean, std = self._stats(images)
        return (images - mean) / std
