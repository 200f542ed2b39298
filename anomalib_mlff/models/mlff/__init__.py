"""MLFF: multi-level feature fusion network (Tang et al., 2025)."""

from . import f2pad_scorer  # noqa: F401  (registers MLFF's scorer with F2PAD)
from .anomaly_map import AnomalyMapGenerator
from .lightning_model import MLFF
from .loss import MLFFLoss
from .torch_model import MLFFModel, MLFFOutput

__all__ = ["MLFF", "AnomalyMapGenerator", "MLFFLoss", "MLFFModel", "MLFFOutput"]
