"""anomalib's ``PatchcoreModel`` with its memory bank replaced by a :class:`FaissMemoryBank`.

Everything else (backbone, layers, feature pooling, embedding, anomaly map, the paper's
re-weighted image score) is anomalib's code, inherited unchanged. Two methods change:
``subsample_embedding`` selects the coreset with :func:`greedy_coreset` through the bank, and
``nearest_neighbors`` searches the bank. ``memory_bank`` reads the bank's buffer, so anomalib's
scoring code, which indexes ``self.memory_bank``, works as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.models.image.patchcore.torch_model import PatchcoreModel

from anomalib_mlff.components.memory_bank import FaissMemoryBank
from anomalib_mlff.components.streaming_coreset import (
    DEFAULT_MEMORY_BUDGET_MB,
    DEFAULT_OVERSAMPLING,
    StreamingCoreset,
)

__all__ = ["FaissPatchcoreModel"]


class FaissPatchcoreModel(PatchcoreModel):
    """PatchCore on a FAISS coreset memory bank.

    Args:
        layers: backbone layers whose features are concatenated.
        backbone: timm backbone name.
        pre_trained: load ImageNet weights for the backbone.
        num_neighbors: neighbours of the nearest bank vector used by the score re-weighting.
        bank: the memory bank (search settings live there); default: exact search.
        memory_budget_mb: memory for the training embeddings kept while the coreset is streamed.
        coreset_sampling_ratio: share of the training embeddings the bank keeps. The streamed store needs it from
            the first reduction on (a reduction may not drop below the coreset of what it has seen).
        coreset_oversampling: chunk reductions keep this many times a chunk's share of the coreset (``None``: none).
    """

    def __init__(
        self,
        layers: Sequence[str],
        backbone: str = "wide_resnet50_2",
        pre_trained: bool = True,
        num_neighbors: int = 9,
        bank: FaissMemoryBank | None = None,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
        coreset_sampling_ratio: float = 0.1,
        coreset_oversampling: float | None = DEFAULT_OVERSAMPLING,
    ) -> None:
        super().__init__(layers=layers, backbone=backbone, pre_trained=pre_trained, num_neighbors=num_neighbors)
        del self.memory_bank  # anomalib's buffer; the bank's buffer takes its place (see the property)
        self.bank = bank if bank is not None else FaissMemoryBank()
        # anomalib passes the ratio again to subsample_embedding, which sets it once more.
        self.embedding_store = StreamingCoreset(
            coreset_sampling_ratio,
            memory_budget_mb,
            seed=self.bank.seed,
            progress=self.bank.progress,
            oversampling=coreset_oversampling,
        )

    @property
    def memory_bank(self) -> torch.Tensor:
        """The bank's vectors (``bank.memory_bank``), where anomalib's code expects them."""
        return self.bank.memory_bank

    @memory_bank.setter
    def memory_bank(self, vectors: torch.Tensor) -> None:
        self.bank.set_memory(vectors)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, dim, h, w)`` PatchCore embedding of ``images``, as ``forward`` computes it (not stored)."""
        with torch.no_grad():
            features = self.feature_extractor(images.type(self.memory_bank.dtype))
        features = {layer: self.feature_pooler(feature) for layer, feature in features.items()}
        return self.generate_embedding(features)

    def subsample_embedding(self, sampling_ratio: float) -> None:
        """Fit the bank with the greedy coreset of the streamed training embeddings (of all DDP ranks)."""
        self.embedding_store.sampling_ratio = sampling_ratio
        self.bank.set_memory(self.embedding_store.finish(device=self.memory_bank.device))

    def nearest_neighbors(self, embedding: torch.Tensor, n_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank search with anomalib's output shapes: ``(n,)`` for one neighbour, else ``(n, k)``."""
        distances, indices = self.bank.search(embedding, n_neighbors)
        if n_neighbors == 1:
            return distances.squeeze(1), indices.squeeze(1)
        return distances, indices
