"""PSG: pseudo sample generation, MFFA's 3-way pretext task that fine-tunes the backbone.

Every normal training image yields three samples: itself (class 0), a CutPaste copy (class 1)
and a CutPaste-Scar copy (class 2), drawn by the project's pseudo-anomaly component. A linear
classifier on the globally pooled deepest backbone features is trained with the backbone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anomalib_mlff.components.pseudo_anomaly import cut_paste, cut_paste_scar

__all__ = ["NORMAL", "CUTPASTE", "SCAR", "PSG_CLASSES", "PSGHead", "pseudo_sample_batch"]

NORMAL, CUTPASTE, SCAR = 0, 1, 2
PSG_CLASSES = ("normal", "cutpaste", "scar")


def pseudo_sample_batch(images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(B, C, H, W)`` normal [0, 1] images -> ``(3B, C, H, W)`` images and their ``(3B,)`` class labels.

    The batch holds the originals, then their CutPaste copies, then their CutPaste-Scar copies.
    """
    cutpaste, _ = cut_paste(images, generator)
    scar, _ = cut_paste_scar(images, generator)
    labels = torch.arange(len(PSG_CLASSES), device=images.device).repeat_interleave(images.shape[0])
    return torch.cat([images, cutpaste, scar]), labels


class PSGHead(nn.Module):
    """Global average pooling + linear layer: deepest features ``(B, C, h, w)`` -> class logits ``(B, 3)``."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(in_channels, len(PSG_CLASSES))

    def forward(self, deep: Tensor) -> Tensor:
        """Class logits of each image."""
        return self.classifier(deep.mean(dim=(2, 3)))
