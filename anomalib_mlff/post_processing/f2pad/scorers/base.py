"""The scorer interface: a model's per-position anomaly scores, differentiable in the pixels.

A scorer turns [0, 1] images into the model's embedding (``embed``) and, once per refinement, fixes
what the paper fixes at the initial estimate (``prepare``), returning the per-position score function
the optimiser calls every iteration. :class:`MemoryBankScorer` is the base of the PatchCore-like
scorers (distance to the nearest of a few bank entries).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from anomalib.models.components import TimmFeatureExtractor
from torch import nn

from anomalib_mlff.components.normalization import PixelRange

from ..window import FeatureWindow

PositionScores = Callable[[torch.Tensor], torch.Tensor]
"""Maps a ``(B, C, h, w)`` embedding of the window crops to ``(B, h, w)`` anomaly scores."""


class MissingScorerError(TypeError):
    """The model has no differentiable scorer, so F2PAD cannot refine its masks."""


@contextmanager
def input_gradients(model: nn.Module) -> Iterator[None]:
    """Let anomalib's feature extractors inside ``model`` record the graph to their input (``no_grad`` otherwise)."""
    extractors = [module for module in model.modules() if isinstance(module, TimmFeatureExtractor)]
    previous = [extractor.requires_grad for extractor in extractors]
    for extractor in extractors:
        extractor.requires_grad = True
    try:
        yield
    finally:
        for extractor, value in zip(extractors, previous, strict=True):
            extractor.requires_grad = value


class DifferentiableScorer(ABC):
    """Per-position anomaly scores of one model's features, differentiable in the pixels.

    Args:
        model: the model's torch module (``AnomalibModule.model``), fitted.
        pixel_range: how the model's pre-processor normalises [0, 1] pixels.
    """

    tolerance: ClassVar[float] = 0.05
    """Default stopping tolerance on the objective's per-iteration decrease (paper: 0.05, PaDiM 0.1)."""

    crop_allowed: bool = True
    """Whether F2PAD may score a crop around the region; ``False`` for features that depend on the whole image
    (attention, image-wide statistics), where a crop would change them."""

    def __init__(self, model: nn.Module, pixel_range: PixelRange) -> None:
        self.model = model
        self.pixel_range = pixel_range
        self.stride, self.alignment = self._strides()

    @property
    def feature_extractor(self) -> nn.Module:
        """The backbone whose features the model scores (anomalib's models call it ``feature_extractor``)."""
        return self.model.feature_extractor

    @property
    def layers(self) -> list[str]:
        """Backbone layers the embedding is built from (the model's ``layers``)."""
        return list(self.model.layers)

    @abstractmethod
    def _embed(self, normalised: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, 3, H, W)`` -> the model's embedding ``(B, C, H / stride, W / stride)``."""

    @abstractmethod
    def prepare(
        self, initial_embedding: torch.Tensor, window: FeatureWindow, positions: torch.Tensor | None = None
    ) -> PositionScores:
        """Fix what depends on the initial estimate; return the score function for these window crops.

        ``positions`` (``(B, h, w)`` bool, the embedding's grid) are the positions whose scores F2PAD uses; a
        scorer may return 0 elsewhere to save work. ``None``: all of them.
        """

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the model's embedding, keeping the graph to the pixels."""
        parameter = next(self.model.parameters(), None)
        dtype = parameter.dtype if parameter is not None else images.dtype
        with input_gradients(self.model):
            return self._embed(self.pixel_range.from_unit(images).to(dtype))

    def window(self, regions: torch.Tensor, margin: int) -> FeatureWindow:
        """Where to score ``(B, H, W)`` regions: a crop around them with ``margin`` pixels, or whole images."""
        if not self.crop_allowed:
            return FeatureWindow.full(regions.shape[0], tuple(regions.shape[-2:]), regions.device)
        return FeatureWindow.around(regions, margin, self.alignment)

    def check_differentiable(self, image_size: tuple[int, int]) -> None:
        """Raise :class:`MissingScorerError` if the scores cannot be differentiated; registered scorers can."""

    def working_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Image size the model can score; models tied to their training grid override this."""
        return image_size

    def _strides(self) -> tuple[int, int]:
        """(embedding stride, largest layer stride) in pixels, from a dry run at 256 px."""
        side = 256
        parameter = next(self.feature_extractor.parameters())
        with torch.no_grad():
            probe = torch.zeros(1, 3, side, side, dtype=parameter.dtype, device=parameter.device)
            features = self.feature_extractor(probe)
        strides = [side // features[layer].shape[-2] for layer in self.layers]
        return min(strides), max(strides)


class MemoryBankScorer(DifferentiableScorer):
    """PatchCore-style score (paper Eq. 5): distance to the nearest of a few memory-bank candidates.

    The candidates of each position are its ``num_candidates`` nearest bank entries at the initial
    estimate, fixed for the whole optimisation. Subclasses say how to search the bank and fetch entries.
    """

    def __init__(self, model: nn.Module, pixel_range: PixelRange, num_candidates: int = 10) -> None:
        super().__init__(model, pixel_range)
        self.num_candidates = num_candidates

    @abstractmethod
    def _search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Indices ``(N, k)`` of the ``k`` nearest bank entries of each query ``(N, C)``."""

    @abstractmethod
    def _entries(self, indices: torch.Tensor) -> torch.Tensor:
        """Bank vectors at ``indices`` (any shape), as a tensor of shape ``(*indices.shape, C)``."""

    @property
    @abstractmethod
    def bank_size(self) -> int:
        """Number of entries in the memory bank."""

    def prepare(
        self, initial_embedding: torch.Tensor, window: FeatureWindow, positions: torch.Tensor | None = None
    ) -> PositionScores:
        """Pick each position's candidate neighbours at the initial estimate (at every position)."""
        del window, positions  # the candidates come from the crop's own features
        if self.bank_size == 0:
            msg = f"{type(self.model).__name__} has an empty memory bank: fit the model before refining with F2PAD."
            raise ValueError(msg)
        batch, channels, height, width = initial_embedding.shape
        k = min(self.num_candidates, self.bank_size)
        queries = initial_embedding.detach().permute(0, 2, 3, 1).reshape(-1, channels)
        candidates = self._entries(self._search(queries, k)).reshape(batch, height, width, k, channels)

        def scores(embedding: torch.Tensor) -> torch.Tensor:
            squared = (embedding.permute(0, 2, 3, 1)[..., None, :] - candidates).square().sum(-1)
            return squared.amin(-1).clamp_min(1e-12).sqrt()

        return scores
