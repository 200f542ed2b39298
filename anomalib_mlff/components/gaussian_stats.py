"""Per-position Gaussian statistics accumulated batch by batch (PaDiM-style models, MFFA's Gaussian branch).

anomalib's ``MultiVariateGaussian.fit`` needs every training embedding at once. The mean and
covariance only need the count, the per-position sums and the sums of outer products, which are
added up batch by batch in float64 (so ``sum x x^T - n mean mean^T`` loses no precision that
float32 would keep) and summed across DDP ranks. Memory: ``positions * channels^2`` float64,
whatever the number of images.
"""

from __future__ import annotations

import torch

from .distributed import max_across_ranks, sum_across_ranks

__all__ = ["GaussianAccumulator"]


class GaussianAccumulator:
    """Running count, sums and outer-product sums of ``(B, C, H, W)`` embeddings, per position."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget every embedding added."""
        self.count = 0
        self.sums: torch.Tensor | None = None  # (P, C)
        self.outer: torch.Tensor | None = None  # (P, C, C)

    def update(self, embedding: torch.Tensor) -> None:
        """Add a batch of ``(B, C, H, W)`` embeddings."""
        if embedding.ndim != 4:
            msg = f"embedding must be (B, C, H, W), got shape {tuple(embedding.shape)}."
            raise ValueError(msg)
        batch, channels = embedding.shape[:2]
        vectors = embedding.detach().reshape(batch, channels, -1).permute(2, 0, 1).double()  # (P, B, C)
        if self.sums is None:
            positions = vectors.shape[0]
            self.sums = vectors.new_zeros(positions, channels)
            self.outer = vectors.new_zeros(positions, channels, channels)
        elif self.sums.shape != (vectors.shape[0], channels):
            earlier = tuple(self.sums.shape[::-1])
            msg = f"embedding has {channels} channels x {vectors.shape[0]} positions, earlier ones {earlier}."
            raise ValueError(msg)
        self.sums += vectors.sum(dim=1)
        self.outer.baddbmm_(vectors.transpose(1, 2), vectors)
        self.count += batch

    def combine_ranks(self, device: torch.device | None = None) -> None:
        """Sum the statistics of all DDP ranks into every rank (a rank without images contributes zeros)."""
        self.count = int(sum_across_ranks(torch.tensor([self.count], device=device))[0])
        local = self.outer.shape[:2] if self.outer is not None else (0, 0)
        positions, channels = (int(n) for n in max_across_ranks(torch.tensor(local, device=device)))
        if self.sums is None:
            self.sums = torch.zeros(positions, channels, dtype=torch.float64, device=device)
            self.outer = torch.zeros(positions, channels, channels, dtype=torch.float64, device=device)
        self.sums = sum_across_ranks(self.sums)
        self.outer = sum_across_ranks(self.outer)

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 mean ``(P, C)`` and unbiased covariance ``(P, C, C)`` (as ``torch.cov``); needs 2 images."""
        if self.count < 2:  # noqa: PLR2004 - a sample covariance needs two observations
            msg = f"a covariance needs at least 2 images, got {self.count}."
            raise ValueError(msg)
        mean = self.sums / self.count
        covariance = (self.outer - self.count * mean.unsqueeze(2) * mean.unsqueeze(1)) / (self.count - 1)
        return mean, covariance
