"""MFFA: CaiT-guided multi-level feature fusion with NNS x Gaussian anomaly map compensation."""

from . import f2pad_scorer  # noqa: F401  (registers MFFA's scorer with F2PAD)
from .anomaly_map import AnomalyMapGenerator
from .lightning_model import MFFA
from .loss import PSGLoss
from .torch_model import MFFAEmbeddings, MFFAModel

__all__ = ["MFFA", "AnomalyMapGenerator", "MFFAEmbeddings", "MFFAModel", "PSGLoss"]
