"""MFFA's training loss: cross-entropy of PSG's normal / CutPaste / CutPaste-Scar classification.

MFFA trains nothing else: the memory bank and the Gaussians are fitted, not optimised.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

__all__ = ["PSGLoss"]


class PSGLoss(nn.Module):
    """Mean cross-entropy of the 3-way logits; also reports the accuracy (not differentiated)."""

    def forward(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """``{"loss": cross-entropy, "accuracy": share of correct predictions}``."""
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": F.cross_entropy(logits, labels), "accuracy": accuracy}
