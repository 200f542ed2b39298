"""MLFF: multi-level feature fusion network (Tang et al., 2025)."""

from .anomaly_map import AnomalyMapGenerator
from .lightning_model import MLFF
from .loss import MLFFLoss
from .torch_model import MLFFModel, MLFFOutput

__all__ = ["MLFF", "AnomalyMapGenerator", "MLFFLoss", "MLFFModel", "MLFFOutput"]
