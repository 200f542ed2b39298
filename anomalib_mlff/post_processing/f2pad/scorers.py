"""Feature-level anomaly scores of a model, differentiable in the input pixels: F2PAD's loss L(X_N).

One small class per model. A scorer turns [0, 1] images into the model's embedding (``embed``) and,
once per refinement, fixes what the paper fixes at the initial estimate (``prepare``), returning the
per-position score function the optimiser calls every iteration. Supporting another model (MLFF,
MFFA, ...) means writing ``_embed`` and ``prepare`` and registering the class with
:func:`register_scorer`.
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

from .window import FeatureWindow

PositionScores = Callable[[torch.Tensor], torch.Tensor]
"""Maps a ``(B, C, h, w)`` embedding of the window crops to ``(B, h, w)`` anomaly scores."""


#: An alignment no image size is a multiple of: F2PAD then works on whole images (see ``FeatureWindow.around``).
#: For scorers whose features depend on the whole image (attention, image-wide statistics), so a crop would
#: change them.
WHOLE_IMAGE_ALIGNMENT = 2**31 - 1


class MissingScorerError(TypeError):
    """The model has no differentiable scorer, so F2PAD cannot refine its masks."""


@contextmanager
def input_gradients(extractor: nn.Module) -> Iterator[None]:
    """Let anomalib's feature extractor record the graph to its input (it runs under ``no_grad`` otherwise)."""
    if not isinstance(extractor, TimmFeatureExtractor):
        yield
        return
    previous = extractor.requires_grad
    extractor.requires_grad = True
    try:
        yield
    finally:
        extractor.requires_grad = previous


class DifferentiableScorer(ABC):
    """Per-position anomaly scores of one model's features, differentiable in the pixels.

    Args:
        model: the model's torch module (``AnomalibModule.model``), fitted.
        pixel_range: how the model's pre-processor normalises [0, 1] pixels.
    """

    tolerance: ClassVar[float] = 0.05
    """Default stopping tolerance on the objective's per-iteration decrease (paper: 0.05, PaDiM 0.1)."""

    def __init__(self, model: nn.Module, pixel_range: PixelRange) -> None:
        if getattr(model, "tiler", None) is not None:
            msg = f"F2PAD cannot refine a tiled {type(model).__name__}: its features would not match the whole image's."
            raise ValueError(msg)
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
        dtype = next(self.feature_extractor.parameters()).dtype
        with input_gradients(self.feature_extractor):
            return self._embed(self.pixel_range.from_unit(images).to(dtype))

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


# model class (module.qualname) -> scorer class; looked up along the model's MRO.
_SCORERS: dict[str, type[DifferentiableScorer]] = {
    "anomalib.models.image.patchcore.torch_model.PatchcoreModel": PatchcoreScorer,
    "anomalib.models.image.padim.torch_model.PadimModel": PadimScorer,
    "anomalib_mlff.models.faiss_patchcore.torch_model.FaissPatchcoreModel": FaissPatchcoreScorer,
}


def register_scorer(model_class: str | type, scorer_class: type[DifferentiableScorer]) -> None:
    """Make F2PAD refine models of ``model_class`` (a class or its ``module.QualName``) with ``scorer_class``."""
    key = model_class if isinstance(model_class, str) else f"{model_class.__module__}.{model_class.__qualname__}"
    _SCORERS[key] = scorer_class


def scorer_class_for(model: nn.Module) -> type[DifferentiableScorer]:
    """The registered scorer for a torch model, or a :class:`MissingScorerError` naming what is missing."""
    for cls in type(model).__mro__:
        scorer = _SCORERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if scorer is not None:
            return scorer
    known = ", ".join(sorted(key.rsplit(".", 1)[-1] for key in _SCORERS))
    msg = (
        f"F2PAD has no differentiable scorer for {type(model).__name__} ({type(model).__module__}): it needs the "
        f"model's feature-level anomaly score as a function of the input pixels. Scorers exist for: {known}. "
        "Write a DifferentiableScorer subclass and call anomalib_mlff.post_processing.f2pad.register_scorer()."
    )
    raise MissingScorerError(msg)


def build_scorer(model: nn.Module, pixel_range: PixelRange, num_candidates: int) -> DifferentiableScorer:
    """Instantiate the registered scorer for ``model``."""
    scorer_class = scorer_class_for(model)
    if issubclass(scorer_class, MemoryBankScorer):
        return scorer_class(model, pixel_range, num_candidates=num_candidates)
    return scorer_class(model, pixel_range)
