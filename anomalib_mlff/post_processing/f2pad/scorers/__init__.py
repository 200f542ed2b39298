"""Feature-level anomaly scores of a model, differentiable in the input pixels: F2PAD's loss L(X_N).

- Any anomalib image model is refined through :class:`AnomalyMapScorer`: its own forward pass, the
  raw anomaly map as a function of the pixels on the whole image, no scorer to write.
- Registered scorers are faster specialisations (crops around the region, candidates fixed at the
  initial estimate): anomalib's PatchCore, PaDiM and CFLOW here, one module each; this plugin's models
  register theirs beside each model (``@register_scorer(MLFFModel)`` in ``models/mlff/f2pad_scorer.py``).
"""

from .anomaly_map import AnomalyMapScorer
from .base import DifferentiableScorer, MemoryBankScorer, MissingScorerError, PositionScores, input_gradients
from .cflow import CflowScorer
from .padim import PadimScorer
from .patchcore import PatchcoreScorer
from .registry import build_scorer, register_scorer, scorer_class_for

__all__ = [
    "AnomalyMapScorer",
    "CflowScorer",
    "DifferentiableScorer",
    "MemoryBankScorer",
    "MissingScorerError",
    "PadimScorer",
    "PatchcoreScorer",
    "PositionScores",
    "build_scorer",
    "input_gradients",
    "register_scorer",
    "scorer_class_for",
]
