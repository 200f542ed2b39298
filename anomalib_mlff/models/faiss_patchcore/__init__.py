"""FaissPatchcore: anomalib's PatchCore on a FAISS greedy-coreset memory bank."""

from . import f2pad_scorer  # noqa: F401  (registers its scorer with F2PAD)
from .lightning_model import FaissPatchcore
from .torch_model import FaissPatchcoreModel

__all__ = ["FaissPatchcore", "FaissPatchcoreModel"]
