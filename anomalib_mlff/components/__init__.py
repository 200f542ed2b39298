# MLFF building blocks: pseudo anomalies, STLNet texture modules, self-calibrated convolution.
from .pseudo_anomaly import PseudoAnomalyGenerator, confetti_noise, cut_paste, cut_paste_scar  # noqa: F401
from .scconv import SelfCalibratedConv  # noqa: F401
from .texture import PyramidTextureExtraction, TextureEnhancement  # noqa: F401
