"""The masks F2PAD starts from: the backbone's, at the validated pixel threshold or ``initial_threshold``.

Without validation masks anomalib sets no pixel threshold and its ``PostProcessor`` masks the map by a
fallback; F2PAD then starts from that fallback's mask, and says once which fallback it is, since the
refinement can only be as good as the region it starts from.
"""

from __future__ import annotations

import logging

import torch
from anomalib.data import Batch
from anomalib.post_processing import PostProcessor
from torch.nn import functional as F  # noqa: N812

from .batch import naming_images
from .optimizer import check_finite

logger = logging.getLogger(__name__)


class WarnOnce:
    """Logs each warning the first time only (F2PAD's hooks run once per batch)."""

    def __init__(self) -> None:
        self.given: set[str] = set()

    def __call__(self, message: str) -> None:
        """Log ``message`` as a warning unless it was logged before."""
        if message not in self.given:
            self.given.add(message)
            logger.warning(message)


def initial_masks(
    post_processor: PostProcessor,
    initial_threshold: float | None,
    batch: Batch,
    raw_anomaly_map: torch.Tensor | None,
    size: torch.Size,
    warn: WarnOnce,
) -> torch.Tensor:
    """The backbone's masks at the image ``size``, ``(B, H, W)`` bool.

    The batch's ``pred_mask`` (the post-processor's threshold) unless ``initial_threshold`` is given or the batch
    has no mask; then the raw anomaly map above ``initial_threshold`` (or the validated pixel threshold).
    """
    if raw_anomaly_map is not None:
        with naming_images(batch):
            check_finite("the anomaly maps", raw_anomaly_map)
    if initial_threshold is None and torch.isnan(post_processor._pixel_threshold).item():  # noqa: SLF001
        _warn_no_pixel_threshold(post_processor, from_batch_mask=batch.pred_mask is not None, warn=warn)
    if initial_threshold is not None or batch.pred_mask is None:
        if raw_anomaly_map is None:
            msg = "F2PAD needs the model's anomaly_map to start from; this model gives none."
            raise ValueError(msg)
        threshold = post_processor.pixel_threshold if initial_threshold is None else initial_threshold
        if torch.isnan(torch.as_tensor(threshold)).item():
            msg = (
                "F2PAD has no initial threshold: validate on images with masks first (F1-optimal threshold) "
                "or pass initial_threshold=<raw anomaly-map value>."
            )
            raise ValueError(msg)
        masks = raw_anomaly_map > threshold
    else:
        masks = batch.pred_mask
    masks = masks.reshape(masks.shape[0], *masks.shape[-2:]).bool()
    if masks.shape[-2:] != size:
        masks = F.interpolate(masks[:, None].float(), size=tuple(size), mode="nearest")[:, 0] > 0
    return masks


def _warn_no_pixel_threshold(post_processor: PostProcessor, from_batch_mask: bool, warn: WarnOnce) -> None:
    """Say once that validation set no pixel threshold, and which fallback gives the initial masks."""
    has_range = not (torch.isnan(post_processor.pixel_min) | torch.isnan(post_processor.pixel_max)).item()
    normalised = post_processor.enable_normalization and has_range
    if from_batch_mask and not normalised:
        fallback = f"{float(post_processor.normalized_pixel_threshold):g} on the un-normalised anomaly map"
    elif not torch.isnan(post_processor.pixel_threshold).item():
        fallback = "the image-level threshold (anomalib's threshold matching)"
    elif from_batch_mask:
        fallback = "the midpoint of the anomaly-map range seen in validation"
    else:
        return  # no threshold at all: initial_masks raises
    warn(
        f"F2PAD: validation set no pixel threshold (no validation masks?), so the initial masks use {fallback}. "
        "Validate on images with masks or pass initial_threshold=<raw anomaly-map value>.",
    )
