"""The model being refined, as F2PAD uses it: its scorer, and its raw anomaly map of [0, 1] images."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from lightning import LightningModule
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mlff.components.normalization import PixelRange

from .scorers import DifferentiableScorer, build_scorer


class ModelScorers:
    """Builds the scorer of a Lightning module's model; the first time per model, checks that it is differentiable.

    The check runs the model forward and backward once, so it is done once per model, not once per batch.
    """

    def __init__(self) -> None:
        self._checked: set[int] = set()

    def __call__(
        self, pl_module: LightningModule, num_candidates: int, image_size: tuple[int, int]
    ) -> DifferentiableScorer:
        """The model's scorer, checked (the first time) on images of ``image_size``."""
        scorer = build_scorer(pl_module.model, PixelRange.of_model(pl_module), num_candidates)
        if id(pl_module.model) not in self._checked:
            scorer.check_differentiable(tuple(image_size))
            self._checked.add(id(pl_module.model))
        return scorer


def anomaly_map_of(pl_module: LightningModule) -> Callable[[torch.Tensor], torch.Tensor]:
    """[0, 1] images ``(B, C, H, W)`` -> the model's raw anomaly maps at the image size, ``(B, H, W)``."""
    pixel_range = PixelRange.of_model(pl_module)

    def anomaly_map(unit_images: torch.Tensor) -> torch.Tensor:
        maps = pl_module.model(pixel_range.from_unit(unit_images)).anomaly_map
        return F.interpolate(maps.reshape(maps.shape[0], 1, *maps.shape[-2:]), size=unit_images.shape[-2:])[:, 0]

    return anomaly_map


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block, its own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
