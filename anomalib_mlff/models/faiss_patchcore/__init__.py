"""FaissPatchcore: anomalib's PatchCore on a FAISS greedy-coreset memory bank."""

from .lightning_model import FaissPatchcore
from .torch_model import FaissPatchcoreModel

__all__ = ["FaissPatchcore", "FaissPatchcoreModel"]
