"""anomalib's PatchCore: distance to the nearest of a few memory-bank candidates (paper Eq. 5)."""

from __future__ import annotations

import torch
from anomalib.models.image.patchcore.torch_model import PatchcoreModel

from .base import MemoryBankScorer
from .registry import register_scorer


@register_scorer(PatchcoreModel)
class PatchcoreScorer(MemoryBankScorer):
    """anomalib's ``PatchcoreModel``: pooled multi-layer embedding, exhaustive bank search for candidates."""

    @property
    def bank_size(self) -> int:
        """Coreset size."""
        return int(self.model.memory_bank.shape[0])

    def _embed(self, normalised: torch.Tensor) -> torch.Tensor:
        features = self.feature_extractor(normalised)
        features = {layer: self.model.feature_pooler(feature) for layer, feature in features.items()}
        return self.model.generate_embedding(features)

    def _search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        _, indices = self.model.nearest_neighbors(queries, n_neighbors=k)
        return indices.reshape(queries.shape[0], k)

    def _entries(self, indices: torch.Tensor) -> torch.Tensor:
        return self.model.memory_bank[indices]
