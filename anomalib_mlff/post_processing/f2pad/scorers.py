"""Feature-level anomaly scores of a model, differentiable in the input pixels: F2PAD's loss L(X_N).

A scorer turns [0, 1] images into the model's embedding (``embed``) and, once per refinement, fixes
what the paper fixes at the initial estimate (``prepare``), returning the per-position score function
the optimiser calls every iteration.

- Any anomalib image model is refined through :class:`AnomalyMapScorer`: its own forward pass, the
  raw anomaly map as a function of the pixels on the whole image, no scorer to write.
- Registered scorers are faster specialisations (crops around the region, candidates fixed at the
  initial estimate): anomalib's PatchCore and PaDiM here, this plugin's models beside each model
  (``@register_scorer(MLFFModel)`` in ``models/mlff/f2pad_scorer.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from anomalib.models.components import TimmFeatureExtractor
from anomalib.models.image.cflow.torch_model import CflowModel
from anomalib.models.image.cflow.utils import get_logp, positional_encoding_2d
from anomalib.models.image.padim.torch_model import PadimModel
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mlff.components.normalization import PixelRange

from .window import FeatureWindow

PositionScores = Callable[[torch.Tensor], torch.Tensor]
"""Maps a ``(B, C, h, w)`` embedding of the window crops to ``(B, h, w)`` anomaly scores."""

class MissingScorerError(TypeError):
    """The model has no differentiable scorer, so F2PAD cannot refine its masks."""


_SCORERS: dict[type, type[DifferentiableScorer]] = {}  # model class -> its specialised scorer


def register_scorer(model_class: type) -> Callable[[type[DifferentiableScorer]], type[DifferentiableScorer]]:
    """Class decorator: F2PAD refines models of ``model_class`` (and its subclasses) with the decorated scorer."""

    def register(scorer_class: type[DifferentiableScorer]) -> type[DifferentiableScorer]:
        _SCORERS[model_class] = scorer_class
        return scorer_class

    return register


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


@register_scorer(PadimModel)
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


class AnomalyMapScorer(DifferentiableScorer):
    """Any anomalib image model: its raw anomaly map (before anomalib's normalisation), through its own forward.

    The "embedding" is the map itself, resized to the image if the model gives it smaller, and each
    pixel's score is its value. Scored on whole images, since a model may use image-wide quantities.
    :meth:`check_differentiable` refuses a model whose map gives the pixels no gradient.
    """

    crop_allowed = False

    def _strides(self) -> tuple[int, int]:
        return 1, 1  # one score per pixel

    def _embed(self, normalised: torch.Tensor) -> torch.Tensor:
        anomaly_map = self._anomaly_map(normalised)
        anomaly_map = anomaly_map.reshape(anomaly_map.shape[0], 1, *anomaly_map.shape[-2:])
        if anomaly_map.shape[-2:] != normalised.shape[-2:]:
            anomaly_map = F.interpolate(anomaly_map, size=normalised.shape[-2:], mode="bilinear")
        return anomaly_map

    def _anomaly_map(self, normalised: torch.Tensor) -> torch.Tensor:
        output = self.model(normalised)
        anomaly_map = getattr(output, "anomaly_map", None)
        if anomaly_map is None:
            msg = (
                f"F2PAD cannot refine {type(self.model).__name__}: its forward pass gives no anomaly map "
                "(image-level scores only)."
            )
            raise MissingScorerError(msg)
        return anomaly_map

    def prepare(
        self, initial_embedding: torch.Tensor, window: FeatureWindow, positions: torch.Tensor | None = None
    ) -> PositionScores:
        """Nothing to fix at the initial estimate: the score is the map's value."""
        del initial_embedding, window, positions

        def scores(embedding: torch.Tensor) -> torch.Tensor:
            return embedding[:, 0]

        return scores

    def check_differentiable(self, image_size: tuple[int, int]) -> None:
        """Run the model once on a ``image_size`` image and check that its map's gradient reaches the pixels."""
        name = type(self.model).__name__
        generator = torch.Generator().manual_seed(0)
        parameter = next(self.model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        probe = torch.rand(1, 3, *image_size, generator=generator).to(device).requires_grad_(True)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                try:
                    anomaly_map = self.embed(probe)
                except MissingScorerError:
                    raise
                except Exception as error:
                    msg = f"F2PAD cannot refine {name}: its forward pass failed ({type(error).__name__}: {error})."
                    raise MissingScorerError(msg) from error
                if not anomaly_map.requires_grad:
                    msg = (
                        f"F2PAD cannot refine {name}: no gradient reaches the pixels from its anomaly map (its forward "
                        "pass runs under torch.no_grad or detaches the map)."
                    )
                    raise MissingScorerError(msg)
                (gradient,) = torch.autograd.grad(anomaly_map.sum(), probe, allow_unused=True)
        finally:
            self.model.train(was_training)
        if gradient is None or not bool(torch.isfinite(gradient).all()) or not bool(gradient.abs().sum() > 0):
            msg = f"F2PAD cannot refine {name}: the gradient of its anomaly map to the pixels is zero or not finite."
            raise MissingScorerError(msg)


@register_scorer(CflowModel)
class CflowScorer(AnomalyMapScorer):
    """anomalib's ``CflowModel``: each layer's negative log-likelihood per feature dimension, summed over layers.

    CFLOW's forward runs its encoder and decoders under ``torch.no_grad`` and turns the likelihoods into a map
    with batch-wide normalisation, so it cannot be differentiated as it is. This scorer computes the same
    likelihoods (encoder features, positional condition, normalising-flow decoder, ``get_logp``) with the graph
    kept, resizes each layer's map to the image bilinearly as CFLOW does, and sums them. Whole images.
    """

    def _anomaly_map(self, normalised: torch.Tensor) -> torch.Tensor:
        features = self.model.encoder(normalised)
        maps = []
        for layer, decoder in zip(self.model.pool_layers, self.model.decoders, strict=True):
            activation = features[layer]
            batch, channels, height, width = activation.shape
            condition = positional_encoding_2d(self.model.condition_vector, height, width).to(activation)
            condition = condition.permute(1, 2, 0).reshape(1, height * width, -1).expand(batch, -1, -1)
            embedding = activation.permute(0, 2, 3, 1).reshape(-1, channels)
            latent, log_jacobian = decoder(embedding, [condition.reshape(batch * height * width, -1)])
            negative_log_likelihood = -get_logp(channels, latent, log_jacobian) / channels
            layer_map = negative_log_likelihood.reshape(batch, 1, height, width)
            maps.append(F.interpolate(layer_map, size=normalised.shape[-2:], mode="bilinear", align_corners=True))
        return torch.stack(maps).sum(0)


def scorer_class_for(model: nn.Module) -> type[DifferentiableScorer]:
    """The registered scorer for a torch model, :class:`AnomalyMapScorer` for any other anomalib model.

    Raises :class:`MissingScorerError` naming the model and the reason when it cannot be refined at all.
    """
    name = f"{type(model).__name__} ({type(model).__module__})"
    if getattr(model, "tiler", None) is not None:
        msg = f"F2PAD cannot refine a tiled {name}: its features would not match the whole image's."
        raise MissingScorerError(msg)
    for cls in type(model).__mro__:
        if cls in _SCORERS:
            return _SCORERS[cls]
    if type(model).__module__.startswith("anomalib.models.video"):
        msg = f"F2PAD cannot refine the video model {name}: it optimises one image, not a clip."
        raise MissingScorerError(msg)
    if not type(model).__module__.startswith("anomalib"):
        known = ", ".join(sorted(cls.__name__ for cls in _SCORERS))
        msg = (
            f"F2PAD has no differentiable scorer for {name}: it refines anomalib's image models through their anomaly "
            f"map, and these with specialised scorers: {known}. For another model write a DifferentiableScorer "
            "subclass and decorate it with @register_scorer(YourModel)."
        )
        raise MissingScorerError(msg)
    return AnomalyMapScorer


def build_scorer(model: nn.Module, pixel_range: PixelRange, num_candidates: int) -> DifferentiableScorer:
    """Instantiate the scorer for ``model``."""
    scorer_class = scorer_class_for(model)
    if issubclass(scorer_class, MemoryBankScorer):
        return scorer_class(model, pixel_range, num_candidates=num_candidates)
    return scorer_class(model, pixel_range)
