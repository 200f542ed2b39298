"""Which scorer refines which model: the registry, and the lookup that falls back to the anomaly map."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from anomalib_mlff.components.normalization import PixelRange

from .anomaly_map import AnomalyMapScorer
from .base import DifferentiableScorer, MemoryBankScorer, MissingScorerError

_SCORERS: dict[type, type[DifferentiableScorer]] = {}  # model class -> its specialised scorer


def register_scorer(model_class: type) -> Callable[[type[DifferentiableScorer]], type[DifferentiableScorer]]:
    """Class decorator: F2PAD refines models of ``model_class`` (and its subclasses) with the decorated scorer."""

    def register(scorer_class: type[DifferentiableScorer]) -> type[DifferentiableScorer]:
        _SCORERS[model_class] = scorer_class
        return scorer_class

    return register


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
