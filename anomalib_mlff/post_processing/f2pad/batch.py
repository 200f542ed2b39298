"""F2PAD on anomalib's batches: the fields it writes, and the images an error is about, named by path."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from anomalib.data import Batch

from .objective import NonFiniteError
from .refinement import Refinement
from .settings import F2PADSettings


def write_results(
    batch: Batch, initial: torch.Tensor, result: Refinement, settings: F2PADSettings, keep_backbone: bool = False
) -> Refinement:
    """Put F2PAD's outputs onto a post-processed ``batch``; returns ``result`` with any images kept at ``initial``.

    ``pred_mask`` becomes the refined mask, ``initial_mask`` and ``normal_image`` are added, ``f2pad_fallback``
    marks the images that kept the backbone's mask. With ``replace_anomaly_map`` the map becomes |A| in [0, 1)
    (mask threshold at 0.5), except on fallback images, which keep the backbone's map so that map and mask agree.

    Args:
        batch: the batch after the usual post-processing (normalised map, thresholded mask).
        initial: the backbone's masks F2PAD started from, ``(B, H, W)`` bool.
        result: the refinement of the batch.
        settings: F2PAD's settings (``replace_anomaly_map``, ``mask_threshold``).
        keep_backbone: keep every image's backbone mask (the calibration found that no refinement helped).
    """
    if keep_backbone:
        result = result.fall_back(initial, initial.flatten(1).any(1))
    batch.initial_mask = initial
    batch.pred_mask = result.pred_mask
    batch.normal_image = result.normal_image
    batch.f2pad_fallback = result.fallback
    if settings.replace_anomaly_map:
        refined_map = result.anomaly_map(settings.mask_threshold)
        backbone_map = batch.anomaly_map
        if result.fallback.any() and backbone_map is not None and backbone_map.numel() == refined_map.numel():
            kept = result.fallback.reshape(-1, *([1] * (backbone_map.ndim - 1)))
            refined_map = torch.where(kept, backbone_map, refined_map.reshape(backbone_map.shape))
        batch.anomaly_map = refined_map
    return result


@contextmanager
def naming_images(batch: Batch) -> Iterator[None]:
    """Turn a :class:`NonFiniteError` into a ``ValueError`` naming the images' files (or batch positions)."""
    try:
        yield
    except NonFiniteError as error:
        paths = batch.image_path
        names = ", ".join(str(paths[item]) if paths else f"batch image {item}" for item in error.items)
        raise ValueError(f"F2PAD: {error.what} of {names} hold NaN or inf.") from error
