"""Mask metrics IoU and DICE for anomalib's ``Evaluator`` (torchmetrics' segmentation metrics).

Both compare binary masks (default fields ``pred_mask`` and ``gt_mask``), score every image on its
own and average over images, as the F2PAD paper reports them. An image whose prediction and ground
truth are both empty has no defined score and is left out (torchmetrics' convention).

    >>> from anomalib.metrics import Evaluator
    >>> evaluator = Evaluator(test_metrics=[IoU(fields=["pred_mask", "gt_mask"], prefix="pixel_"), Dice(...)])
"""

from __future__ import annotations

from typing import Any

import torch
from anomalib.metrics import AnomalibMetric
from torchmetrics.segmentation import DiceScore, MeanIoU


def _as_index_masks(mask: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` or ``(B, 1, H, W)`` binary masks as class indices (0 background, 1 defect)."""
    if mask.ndim == 4:
        mask = mask.squeeze(1)
    return mask.bool().long()


class _BinaryMaskIoU(MeanIoU):
    """Foreground IoU of binary masks, per image, averaged."""

    def __init__(self, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(num_classes=2, include_background=False, input_format="index", **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and true masks."""
        super().update(_as_index_masks(preds), _as_index_masks(target))


class _BinaryMaskDice(DiceScore):
    """Foreground DICE of binary masks, per image, averaged."""

    def __init__(self, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(
            num_classes=2,
            include_background=False,
            input_format="index",
            average="macro",
            aggregation_level="samplewise",
            **kwargs,
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and true masks."""
        super().update(_as_index_masks(preds), _as_index_masks(target))


class IoU(AnomalibMetric, _BinaryMaskIoU):  # type: ignore[misc]
    """Intersection over union of predicted and true masks, mean over images."""

    default_fields = ("pred_mask", "gt_mask")


class Dice(AnomalibMetric, _BinaryMaskDice):  # type: ignore[misc]
    """DICE coefficient of predicted and true masks, mean over images."""

    default_fields = ("pred_mask", "gt_mask")


def mean_mask_iou(preds: torch.Tensor, target: torch.Tensor) -> float:
    """:class:`IoU` of a batch of masks outside an ``Evaluator``: per image, averaged."""
    metric = _BinaryMaskIoU().to(preds.device)
    metric.update(preds, target)
    return float(metric.compute())
