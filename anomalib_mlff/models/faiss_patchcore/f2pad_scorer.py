"""F2PAD's differentiable scorer for FaissPatchcore: PatchCore's, with candidates from the FAISS bank's search.

Registered with F2PAD on import (``anomalib_mlff.models.faiss_patchcore`` imports this module).
"""

from __future__ import annotations

import torch

from anomalib_mlff.post_processing.f2pad.scorers import PatchcoreScorer, register_scorer

from .torch_model import FaissPatchcoreModel

__all__ = ["FaissPatchcoreScorer"]


@register_scorer(FaissPatchcoreModel)
class FaissPatchcoreScorer(PatchcoreScorer):
    """``FaissPatchcoreModel``: PatchCore's embedding, candidates from the FAISS bank's own search."""

    @property
    def bank_size(self) -> int:
        """Coreset size of the FAISS bank."""
        return int(self.model.bank.memory_bank.shape[0])

    def _search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        _, indices = self.model.bank.search(queries, k)
        return indices

    def _entries(self, indices: torch.Tensor) -> torch.Tensor:
        return self.model.bank.memory_bank[indices]
