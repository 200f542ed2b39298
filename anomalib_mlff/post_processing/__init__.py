"""Post-processors: :class:`F2PAD` refines feature-level anomaly maps into pixel-accurate masks."""

import anomalib_mlff.models  # noqa: F401  (registers the models first: see anomalib_mlff.models)
from .f2pad import F2PAD, Dice, IoU

__all__ = ["F2PAD", "Dice", "IoU"]
