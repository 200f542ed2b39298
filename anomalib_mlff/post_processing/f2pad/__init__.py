"""F2PAD: pixel-accurate anomaly masks from feature-based models, as an anomalib post-processor.

Public API: :class:`F2PAD` (the post-processor), :class:`F2PADSettings` (its settings), :class:`IoU` and
:class:`Dice` (mask metrics for anomalib's ``Evaluator``), :func:`refine` (the procedure on tensors), the
scorer interface (:class:`DifferentiableScorer`, :func:`register_scorer`, :class:`AnomalyMapScorer` for models
without one) and the inpainters.
"""

from .inpaint import ClassicalInpainter, Inpainter, MAEInpainter, MaskedAutoencoder
from .metrics import Dice, IoU
from .post_processor import F2PAD
from .prior import PixelPrior
from .refinement import Refinement, refine
from .scorers import (
    AnomalyMapScorer,
    DifferentiableScorer,
    MemoryBankScorer,
    MissingScorerError,
    PadimScorer,
    PatchcoreScorer,
    register_scorer,
)
from .settings import F2PADSettings
from .visualization import refinement_figure

__all__ = [
    "F2PAD",
    "AnomalyMapScorer",
    "ClassicalInpainter",
    "Dice",
    "DifferentiableScorer",
    "F2PADSettings",
    "Inpainter",
    "IoU",
    "MAEInpainter",
    "MaskedAutoencoder",
    "MemoryBankScorer",
    "MissingScorerError",
    "PadimScorer",
    "PatchcoreScorer",
    "PixelPrior",
    "Refinement",
    "refine",
    "refinement_figure",
    "register_scorer",
]
