"""MFFA's Gaussian branch: PaDiM's per-position multivariate Gaussian on randomly selected dimensions.

anomalib's :class:`MultiVariateGaussian` fits the mean and the inverse of ``covariance + 0.01 I``
(the paper's lambda) at every grid position; anomalib's PaDiM distance gives the Mahalanobis
score. The selected dimensions are a buffer drawn once from a seeded generator. Training
embeddings are accumulated batch by batch (:class:`GaussianAccumulator`, float64 sums), so the
fit's memory does not grow with the number of images; the result equals anomalib's batch fit.
"""

from __future__ import annotations

import torch
from anomalib.models.components.stats import MultiVariateGaussian
from anomalib.models.image.padim.anomaly_map import AnomalyMapGenerator as PadimAnomalyMap
from torch import Tensor, nn

from anomalib_mlff.components.gaussian_stats import GaussianAccumulator

__all__ = ["MIN_GAUSSIAN_IMAGES", "GaussianBranch"]

#: A sample covariance needs at least two observations per position.
MIN_GAUSSIAN_IMAGES = 2
#: anomalib's ``MultiVariateGaussian`` regularisation: ``0.01 I`` (the paper's lambda), then ``1e-5 I``
#: before inverting.
COVARIANCE_REGULARISATION = 0.01 + 1e-5


class GaussianBranch(nn.Module):
    """Per-position Gaussian over ``n_features`` of ``in_channels`` embedding dimensions.

    Args:
        in_channels: width of the embedding the dimensions are selected from.
        n_features: number of randomly selected dimensions (paper: 570).
        generator: draws the selection.
    """

    def __init__(self, in_channels: int, n_features: int, generator: torch.Generator) -> None:
        super().__init__()
        if not isinstance(n_features, int) or not 1 <= n_features <= in_channels:
            msg = (
                f"n_gaussian_features must be an integer in [1, {in_channels}] (the embedding's width), "
                f"got {n_features!r}."
            )
            raise ValueError(msg)
        self.register_buffer("feature_index", torch.randperm(in_channels, generator=generator)[:n_features])
        self.gaussian = MultiVariateGaussian()
        self.accumulator = GaussianAccumulator()

    @property
    def is_fitted(self) -> bool:
        """Whether Gaussians have been fitted."""
        return self.gaussian.mean.numel() > 0

    @property
    def grid_positions(self) -> int:
        """Number of grid positions the Gaussians were fitted on (0 before fitting)."""
        return int(self.gaussian.mean.shape[-1]) if self.is_fitted else 0

    def select(self, embedding: Tensor) -> Tensor:
        """Keep the selected dimensions of a ``(B, C, h, w)`` embedding."""
        return embedding.index_select(1, self.feature_index)

    def accumulate(self, selected: Tensor) -> None:
        """Add ``(B, n_features, h, w)`` selected training embeddings to the running statistics."""
        self.accumulator.update(selected)

    def finish(self) -> None:
        """Fit the Gaussians from everything accumulated (of all DDP ranks), as anomalib's ``MultiVariateGaussian``."""
        accumulator = self.accumulator
        accumulator.combine_ranks(device=self.feature_index.device)
        if accumulator.count < MIN_GAUSSIAN_IMAGES:
            msg = (
                f"The Gaussian branch needs at least {MIN_GAUSSIAN_IMAGES} training images to estimate a covariance, "
                f"got {accumulator.count}. Add training images or set use_gaussian=False (NNS only)."
            )
            accumulator.clear()
            raise ValueError(msg)
        mean, covariance = accumulator.mean_and_covariance()
        accumulator.clear()
        identity = torch.eye(covariance.shape[-1], dtype=covariance.dtype, device=covariance.device)
        dtype = self.gaussian.mean.dtype
        self.gaussian.mean = mean.T.contiguous().to(dtype)  # (C, P), anomalib's layout
        self.gaussian.inv_covariance = torch.linalg.inv(covariance + COVARIANCE_REGULARISATION * identity).to(dtype)

    def fit(self, selected: Tensor) -> None:
        """Fit the Gaussians to ``(N, n_features, h, w)`` selected embeddings of N training images."""
        self.accumulate(selected)
        self.finish()

    def forward(self, selected: Tensor) -> Tensor:
        """Mahalanobis distance of each position's embedding to its Gaussian: ``(B, 1, h, w)``."""
        return PadimAnomalyMap.compute_distance(selected, [self.gaussian.mean, self.gaussian.inv_covariance])
