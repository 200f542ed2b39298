"""Side-by-side picture of an F2PAD result: original image, recovered normal image, refined mask."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from anomalib.data import Batch
from anomalib.visualization.image.functional import (
    add_text_to_image,
    create_image_grid,
    visualize_image,
    visualize_mask,
)
from PIL import Image

if TYPE_CHECKING:
    from .refinement import Refinement


def refinement_figure(
    image: torch.Tensor,
    normal_image: torch.Tensor,
    mask: torch.Tensor,
    gt_mask: torch.Tensor | None = None,
) -> Image.Image:
    """One row: the image, the recovered normal image, the refined mask (and the ground truth if given).

    ``image`` and ``normal_image`` are ``(C, H, W)`` in [0, 1]; masks ``(H, W)``.
    """
    panels = [
        ("image", _picture(image)),
        ("recovered normal image", _picture(normal_image)),
        ("F2PAD mask", _mask(mask)),
    ]
    if gt_mask is not None:
        panels.append(("ground truth", _mask(gt_mask)))
    labelled = [add_text_to_image(picture, title, size=max(10, picture.height // 16)) for title, picture in panels]
    return create_image_grid(labelled, nrow=len(labelled))


def save_figures(directory: Path, batch: Batch, images: torch.Tensor, result: Refinement) -> None:
    """One :func:`refinement_figure` per image of ``batch`` in ``directory``, named after the image's last two path
    parts (``good_000.png``); ``images`` are the batch's [0, 1] images."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = batch.image_path or [f"image_{index}" for index in range(images.shape[0])]
    gt_masks = batch.gt_mask if batch.gt_mask is not None else [None] * images.shape[0]
    for path, image, normal, mask, gt_mask in zip(
        paths, images, result.normal_image, result.pred_mask, gt_masks, strict=True
    ):
        name = "_".join(Path(path).with_suffix("").parts[-2:]) + ".png"
        refinement_figure(image, normal, mask, gt_mask).save(directory / name)


def _picture(image: torch.Tensor) -> Image.Image:
    rgb = image.detach().float().cpu().clamp(0, 1)
    if rgb.shape[0] == 1:
        rgb = rgb.expand(3, -1, -1)
    return visualize_image(rgb)


def _mask(mask: torch.Tensor) -> Image.Image:
    return visualize_mask(mask.detach().cpu().squeeze().bool(), mode="binary").convert("RGB")
