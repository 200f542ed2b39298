"""What F2PAD keeps of the training batches: pixels for the pixel prior and a few images for the calibration.

Bounded whatever the training set's size: at most ``prior_samples`` pixels (``prior_samples // 50`` drawn per
image, so about 50 images contribute) and ``calibration_images`` whole images, kept on the CPU.
"""

from __future__ import annotations

import torch


class TrainingSamples:
    """Collects training pixels and images batch by batch, up to budgets; ``take_*`` hands them over once."""

    def __init__(self) -> None:
        self._pixels: list[torch.Tensor] = []
        self._images: list[torch.Tensor] = []

    @property
    def pixel_count(self) -> int:
        """Pixels collected and not yet taken."""
        return sum(sample.shape[0] for sample in self._pixels)

    @property
    def image_count(self) -> int:
        """Images collected and not yet taken."""
        return sum(sample.shape[0] for sample in self._images)

    def add(self, unit_images: torch.Tensor, pixel_budget: int, image_budget: int) -> None:
        """Keep what the budgets still allow of a batch of [0, 1] images ``(B, C, H, W)``.

        Args:
            unit_images: the batch, pixels in [0, 1].
            pixel_budget: pixels to hold in all for the prior (``prior_samples``; 0 once the prior is fitted).
            image_budget: images to hold in all for the calibration (``calibration_images``; 0 once it has run).
        """
        wanted = image_budget - self.image_count
        if wanted > 0:
            self._images.append(unit_images[:wanted].detach().cpu())
        if self.pixel_count >= pixel_budget:
            return
        batch, channels = unit_images.shape[:2]
        per_image = max(1, pixel_budget // 50)
        flat = unit_images.detach().permute(0, 2, 3, 1).reshape(batch, -1, channels)
        picks = torch.randint(flat.shape[1], (batch, per_image), device=flat.device)
        sample = torch.gather(flat, 1, picks[..., None].expand(-1, -1, channels)).reshape(-1, channels)
        self._pixels.append(sample[: pixel_budget - self.pixel_count].cpu())

    def take_pixels(self) -> torch.Tensor | None:
        """The collected pixels ``(N, C)`` (``None`` if there are none), forgotten here."""
        return self._take(self._pixels)

    def take_images(self) -> torch.Tensor | None:
        """The collected images ``(N, C, H, W)`` (``None`` if there are none), forgotten here."""
        return self._take(self._images)

    @staticmethod
    def _take(samples: list[torch.Tensor]) -> torch.Tensor | None:
        if not samples:
            return None
        taken = torch.cat(samples)
        samples.clear()
        return taken
