"""MLFF: multi-level feature fusion network (Tang et al., 2025)."""

from .lightning_model import MLFF
from .torch_model import MLFFModel

__all__ = ["MLFF", "MLFFModel"]
