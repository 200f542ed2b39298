"""F2PAD's differentiable scorer for MFFA: the AMC product of the NNS and Gaussian patch scores.

Per position of the Gaussian grid, the score is ``d_NNS x d_Mahalanobis``: AMC's product taken on
that grid (MFFA's ``patch_scores``), whereas MFFA's own map resizes each branch to the image
bilinearly before multiplying and blurring. The embedding F2PAD optimises through packs both branches on that
grid: the NNS embedding nearest-upsampled (each middle-layer cell repeated, so its distance is
unchanged) followed by the Gaussian dimensions. The NNS part uses F2PAD's memory-bank scheme
(distance to the nearest of a few candidates fixed at the initial estimate), the Gaussian part
F2PAD's PaDiM scorer on MFFA's Gaussians.

LGFFP's CaiT attends over the whole grid and its positional embedding is resampled to the grid,
so a crop would change every feature: with LGFFP the scorer asks F2PAD for whole-image windows.
Registered with F2PAD on import (``anomalib_mlff.models.mffa`` imports this module).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_mlff.components.normalization import PixelRange
from anomalib_mlff.post_processing.f2pad.scorers import (
    MemoryBankScorer,
    PadimScorer,
    PositionScores,
    register_scorer,
)
from anomalib_mlff.post_processing.f2pad.window import FeatureWindow

from .torch_model import MFFAModel

__all__ = ["MFFAScorer"]


@register_scorer(MFFAModel)
class MFFAScorer(MemoryBankScorer):
    """``d_NNS x d_Mahalanobis`` per position of MFFA's Gaussian grid (or one branch's score alone).

    Args:
        model: a fitted :class:`MFFAModel`.
        pixel_range: how the model's pre-processor normalises [0, 1] pixels.
        num_candidates: memory-bank candidates per position, fixed at the initial estimate.
    """

    def __init__(self, model: MFFAModel, pixel_range: PixelRange, num_candidates: int = 10) -> None:
        super().__init__(model, pixel_range, num_candidates)
        self.crop_allowed = model.lgffp is None  # CaiT attends over the whole grid
        self._gaussian_scorer = None
        if model.gaussian is not None:
            gaussians = SimpleNamespace(
                feature_extractor=model.feature_extractor, layers=self.layers, gaussian=model.gaussian.gaussian
            )
            self._gaussian_scorer = PadimScorer(gaussians, pixel_range)

    @property
    def layers(self) -> list[str]:
        """The grid layer and the deeper ones: the embedding's stride is the grid layer's."""
        layers = list(self.model.layers)
        grid_layer = self.model.grid_layer if self.model.gaussian is not None else layers[1]
        return layers[layers.index(grid_layer) :]

    @property
    def bank_size(self) -> int:
        """Entries in the NNS memory bank (0 without the NNS branch)."""
        return int(self.model.nns.bank.memory_bank.shape[0]) if self.model.nns is not None else 0

    @property
    def _nns_channels(self) -> int:
        return sum(self.model.feature_extractor.out_dims[1:]) if self.model.nns is not None else 0

    def _search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        _, indices = self.model.nns.bank.search(queries, k)
        return indices.reshape(queries.shape[0], k)

    def _entries(self, indices: torch.Tensor) -> torch.Tensor:
        return self.model.nns.bank.memory_bank[indices]

    def _embed(self, normalised: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.embed_features(self.feature_extractor(normalised))
        if embeddings.gaussian is None:
            return embeddings.nns
        if embeddings.nns is None:
            return embeddings.gaussian
        nns = F.interpolate(embeddings.nns, size=embeddings.gaussian.shape[-2:], mode="nearest")
        return torch.cat([nns, embeddings.gaussian], dim=1)

    def working_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The size whose grid matches the fitted Gaussians (any size for NNS only)."""
        if self._gaussian_scorer is None:
            return image_size
        return self._gaussian_scorer.working_size(image_size)

    def prepare(
        self, initial_embedding: torch.Tensor, window: FeatureWindow, positions: torch.Tensor | None = None
    ) -> PositionScores:
        """Fix the NNS candidates and gather the window's Gaussians (every position); return the product score."""
        del positions
        split = self._nns_channels
        nns_scores = super().prepare(initial_embedding[:, :split], window) if split else None
        gaussian_scores = (
            self._gaussian_scorer.prepare(initial_embedding[:, split:], window) if self._gaussian_scorer else None
        )

        def scores(embedding: torch.Tensor) -> torch.Tensor:
            result = nns_scores(embedding[:, :split]) if nns_scores is not None else 1.0
            if gaussian_scores is not None:
                result = result * gaussian_scores(embedding[:, split:]).clamp_min(1e-12).sqrt()
            return result

        return scores

