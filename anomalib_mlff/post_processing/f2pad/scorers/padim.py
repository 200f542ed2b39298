"""anomalib's PaDiM: squared Mahalanobis distance to each position's Gaussian (paper Eq. 7)."""

from __future__ import annotations

from typing import ClassVar

import torch
from anomalib.models.image.padim.torch_model import PadimModel

from ..window import FeatureWindow
from .base import DifferentiableScorer, PositionScores
from .registry import register_scorer


@register_scorer(PadimModel)
class PadimScorer(DifferentiableScorer):
    """anomalib's ``PadimModel``: squared Mahalanobis distance to each position's Gaussian (paper Eq. 7)."""

    tolerance: ClassVar[float] = 0.1

    @property
    def grid_positions(self) -> int:
        """Number of positions the Gaussians were fitted on."""
        return int(self.model.gaussian.mean.shape[-1])

    def _embed(self, normalised: torch.Tensor) -> torch.Tensor:
        return self.model.generate_embedding(self.feature_extractor(normalised))

    def working_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The given size if its grid matches the fitted one, else the square size that does."""
        height, width = image_size
        if (height // self.stride) * (width // self.stride) == self.grid_positions:
            return image_size
        side = round(self.grid_positions**0.5)
        if side * side != self.grid_positions:
            msg = (
                f"PaDiM was fitted on {self.grid_positions} positions, which an image of {image_size} does not give; "
                "refine at the training image size."
            )
            raise ValueError(msg)
        return (side * self.stride, side * self.stride)

    def prepare(
        self, initial_embedding: torch.Tensor, window: FeatureWindow, positions: torch.Tensor | None = None
    ) -> PositionScores:
        """Gather the Gaussians of the window's positions once; only ``positions`` are scored (others 0).

        Each position reads its own C x C inverse covariance every iteration (164 MB for a 256 px crop of
        resnet18's 100 features), so scoring only the positions F2PAD uses saves most of the Mahalanobis cost.
        """
        batch, channels, height, width = initial_embedding.shape
        grid_height, grid_width = (extent // self.stride for extent in window.image_size)
        if grid_height * grid_width != self.grid_positions:
            msg = (
                f"PaDiM was fitted on {self.grid_positions} positions; images of {window.image_size} give "
                f"{grid_height * grid_width}."
            )
            raise ValueError(msg)
        offsets = window.grid_offsets(self.stride)
        rows = torch.arange(height, device=offsets.device)[None, :, None] + offsets[:, 0, None, None]
        cols = torch.arange(width, device=offsets.device)[None, None, :] + offsets[:, 1, None, None]
        grid = (rows * grid_width + cols).reshape(batch, -1)  # each crop position's index in the fitted grid
        if positions is not None and tuple(positions.shape) != (batch, height, width):
            msg = f"PaDiM positions {tuple(positions.shape)} do not match its embedding grid {(batch, height, width)}."
            raise ValueError(msg)
        scored = torch.ones_like(grid, dtype=torch.bool) if positions is None else positions.reshape(batch, -1)
        items, places = scored.nonzero(as_tuple=True)  # the scored (image, crop position) pairs
        device = initial_embedding.device
        mean = self.model.gaussian.mean.to(device).T[grid[items, places]]  # (N, C)
        inv_covariance = self.model.gaussian.inv_covariance.to(device)[grid[items, places]]  # (N, C, C)
        del channels

        def scores(embedding: torch.Tensor) -> torch.Tensor:
            delta = embedding.flatten(2).transpose(1, 2)[items, places] - mean
            squared = torch.einsum("nc,ncd,nd->n", delta, inv_covariance, delta)
            result = squared.new_zeros(batch, height * width).index_put((items, places), squared)
            return result.reshape(batch, height, width)

        return scores
