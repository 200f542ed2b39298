"""Post-processors: :class:`F2PAD` refines feature-level anomaly maps into pixel-accurate masks."""

from .f2pad import F2PAD, Dice, IoU

__all__ = ["F2PAD", "Dice", "IoU"]
