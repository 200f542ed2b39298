"""Figures a person looks at: test images with their maps and masks, and measured-vs-paper bar charts.

Figures are built with matplotlib's ``Figure`` directly (no pyplot), so writing one needs no display and
does not change the backend of the calling program.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["bar_chart", "prediction_grid"]


def _as_image(tensor: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` or ``(H, W)`` tensor -> ``(H, W, C)`` / ``(H, W)`` float array in [0, 1] for ``imshow``."""
    array = tensor.detach().cpu().float().squeeze().numpy()
    if array.ndim == 3:
        array = np.moveaxis(array, 0, -1)
        low, high = array.min(), array.max()
        array = (array - low) / (high - low) if high > low else np.zeros_like(array)
    return array


def prediction_grid(
    images: Sequence[torch.Tensor],
    anomaly_maps: Sequence[torch.Tensor],
    pred_masks: Sequence[torch.Tensor],
    gt_masks: Sequence[torch.Tensor],
    titles: Sequence[str],
    path: Path,
) -> Path:
    """One column per image: image, ground-truth mask, anomaly map (fixed [0, 1] scale), predicted mask."""
    rows = (("image", images, None), ("ground truth", gt_masks, "gray"), ("anomaly map", anomaly_maps, "jet"),
            ("predicted mask", pred_masks, "gray"))
    figure = Figure(figsize=(2.2 * len(images), 2.2 * len(rows)))
    axes = figure.subplots(len(rows), len(images), squeeze=False)
    for row, (label, tensors, colour_map) in enumerate(rows):
        for column, tensor in enumerate(tensors):
            axis = axes[row][column]
            scale = {"vmin": 0.0, "vmax": 1.0} if colour_map else {}
            axis.imshow(_as_image(tensor), cmap=colour_map, **scale)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(titles[column], fontsize=8)
            if column == 0:
                axis.set_ylabel(label, fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def bar_chart(values: Mapping[str, Mapping[str, float]], title: str, path: Path) -> Path:
    """Grouped bars: one group per key of ``values`` (e.g. a model), one bar per inner key (e.g. paper / measured)."""
    groups = list(values)
    series = sorted({name for inner in values.values() for name in inner})
    width = 0.8 / max(1, len(series))
    figure = Figure(figsize=(max(4.0, 1.2 * len(groups) * max(1, len(series))), 3.5))
    axis = figure.subplots()
    for index, name in enumerate(series):
        heights = [values[group].get(name, np.nan) for group in groups]
        positions = np.arange(len(groups)) + (index - (len(series) - 1) / 2) * width
        axis.bar(positions, heights, width, label=name)
    axis.set_xticks(np.arange(len(groups)), groups, fontsize=8)
    axis.set_ylim(0, 100)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
