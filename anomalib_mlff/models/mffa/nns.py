"""MFFA's NNS branch: PatchCore-style patch embeddings scored by their nearest memory-bank entry.

Middle and deep CNN features are 3x3 average-pooled (stride 1) for a larger receptive field and
robustness to small shifts, the deep ones resized to the middle grid, and concatenated. A
coreset of the training embeddings (ratio 0.01) forms the memory bank; a patch's score is the
Euclidean distance to its nearest entry. The embeddings stream through a bounded-memory
:class:`StreamingCoreset` batch by batch (:meth:`NNSBranch.accumulate`, then :meth:`NNSBranch.finish`).
"""

from __future__ import annotations

import torch
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from torch import Tensor, nn

from anomalib_mlff.components.memory_bank import FaissMemoryBank
from anomalib_mlff.components.model_checks import capturing_graph
from anomalib_mlff.components.streaming_coreset import DEFAULT_MEMORY_BUDGET_MB, StreamingCoreset, embedding_rows

from .lgffp import resize_to

__all__ = ["NNSBranch"]


class NNSBranch(nn.Module):
    """Pooled middle + deep embedding and a memory bank of its coreset.

    Args:
        coreset_ratio: share of the training embeddings kept in the memory bank (paper: 0.01).
        approximate: let FAISS search an approximate index (exact by default).
        seed: seeds the coreset selection.
        memory_budget_mb: memory for the training embeddings while the coreset is streamed.
    """

    def __init__(
        self,
        coreset_ratio: float = 0.01,
        approximate: bool = False,
        seed: int = 0,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    ) -> None:
        super().__init__()
        if not 0 < coreset_ratio <= 1:
            msg = f"coreset_ratio must be in (0, 1], got coreset_ratio={coreset_ratio}."
            raise ValueError(msg)
        self.coreset_ratio = coreset_ratio
        self.pool = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        self.bank = FaissMemoryBank(approximate=approximate, seed=seed)
        self.store = StreamingCoreset(coreset_ratio, memory_budget_mb, seed=seed, parameter="memory_budget_mb")

    @property
    def is_fitted(self) -> bool:
        """Whether the memory bank holds entries."""
        return self.bank.is_fitted

    def embed(self, middle: Tensor, deep: Tensor) -> Tensor:
        """``(B, C_middle + C_deep, h, w)`` pooled embedding on the middle layer's grid."""
        middle = self.pool(middle)
        return torch.cat([middle, resize_to(self.pool(deep), middle.shape[-2:])], dim=1)

    def accumulate(self, embeddings: Tensor) -> None:
        """Stream ``(B, C, h, w)`` training embeddings into the coreset store."""
        self.store.append(embeddings.permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1]))

    def finish(self) -> None:
        """Fill the memory bank with the coreset of everything accumulated (of all DDP ranks)."""
        self.bank.set_memory(self.store.finish(device=self.bank.memory_bank.device))

    def check_budget(self, model: nn.Module, images: int, image: Tensor, ranks: int = 1) -> None:
        """Raise ``ValueError`` naming ``memory_budget_mb`` unless it holds the coreset of ``images`` training
        images; ``model.embed(image)`` (one image, eval mode) gives the rows per image and their width."""
        rows, dim = embedding_rows(model, lambda batch: model.embed(batch).nns, image)
        self.store.check_budget(images * rows, dim, ranks=ranks)

    def fit(self, embeddings: Tensor) -> None:
        """Fill the memory bank from ``(N, C, h, w)`` training embeddings (coreset subsampled)."""
        self.accumulate(embeddings)
        self.finish()

    def forward(self, embedding: Tensor) -> Tensor:
        """Distance of each position to its nearest memory-bank entry: ``(B, 1, h, w)``."""
        batch, channels, height, width = embedding.shape
        queries = embedding.permute(0, 2, 3, 1).reshape(-1, channels)
        if capturing_graph():
            # FaissMemoryBank's own export path loops over query chunks, which fixes the exported batch
            # size to the example's; one un-chunked distance matrix keeps the batch dynamic.
            distances = PatchcoreModel.euclidean_dist(queries, self.bank.memory_bank).amin(dim=1)
        else:
            distances, _ = self.bank.search(queries, 1)
        return distances.reshape(batch, height, width, 1).permute(0, 3, 1, 2)

