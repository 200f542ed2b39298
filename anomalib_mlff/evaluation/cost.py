"""What a model costs and how well a coreset covers: time per image, FLOPs, coverage radius."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from anomalib.data import AnomalibDataModule
from anomalib.models.components import AnomalibModule
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["coverage_radius", "gflop", "model_gflop_per_image", "model_ms_per_image", "preprocessed_test_batches"]


def preprocessed_test_batches(model: AnomalibModule, datamodule: AnomalibDataModule) -> list[torch.Tensor]:
    """The test images of ``datamodule`` as the torch model sees them (after the model's pre-processor)."""
    transform = model.pre_processor.transform
    return [transform(batch.image) for batch in datamodule.test_dataloader()]


def model_ms_per_image(model: AnomalibModule, batches: list[torch.Tensor], repeats: int = 3) -> float:
    """Forward time of the torch model alone on the pre-processed ``batches`` (ms per image, best of ``repeats``)."""
    count = sum(len(batch) for batch in batches)
    network = model.model.eval()
    best = float("inf")
    with torch.no_grad():
        network(batches[0])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in batches:
                network(batch)
            best = min(best, time.perf_counter() - start)
    return 1000 * best / count


def gflop(step: Callable[[], object]) -> float:
    """GFLOP of one call without autograd (torch's ``FlopCounterMode``: convolutions and matrix products)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        step()
    return counter.get_total_flops() / 1e9


def model_gflop_per_image(model: AnomalibModule, image: torch.Tensor) -> float:
    """GFLOP of the torch model's forward on one pre-processed ``(1, C, H, W)`` image.

    Counts convolutions and matrix products; FAISS searches (FaissPatchcore, MFFA's NNS branch) run
    outside torch and are not counted.
    """
    return gflop(lambda: model.model.eval()(image))


def coverage_radius(embeddings: torch.Tensor, indices: torch.Tensor, block: int = 4096) -> float:
    """Largest distance from an embedding to its nearest coreset member ``embeddings[indices]``."""
    return float(nearest_distances(embeddings, embeddings[indices], block).max())


def nearest_distances(embeddings: torch.Tensor, centres: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Distance from each embedding ``(N, C)`` to its nearest row of ``centres``, ``(N,)``, in blocks of rows."""
    nearest = [torch.cdist(embeddings[i : i + block], centres).amin(dim=1) for i in range(0, len(embeddings), block)]
    return torch.cat(nearest)
