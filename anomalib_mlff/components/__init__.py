"""Building blocks shared by the models: pseudo anomalies, texture and self-calibrated blocks, memory bank."""

from .coreset import greedy_coreset  # noqa: F401
from .memory_bank import FaissMemoryBank  # noqa: F401
from .pseudo_anomaly import PseudoAnomalyGenerator, confetti_noise, cut_paste, cut_paste_scar  # noqa: F401
from .scconv import SelfCalibratedConv  # noqa: F401
from .texture import PyramidTextureExtraction, TextureEnhancement  # noqa: F401
