"""F2PAD's settings: one frozen object, its defaults written here only.

:class:`~anomalib_mlff.post_processing.f2pad.F2PAD` takes a :class:`F2PADSettings` and every field as a flat
constructor argument (anomalib's CLI and YAML need them; ``arguments.py`` builds its signature from these
fields) and saves and restores the object whole with the checkpoint. :func:`refine` takes the same object.
Adding a setting is adding a field here (with its docstring). Pixel quantities are in [0, 1] pixel units and
pixels at the model's input size; where a default differs from the paper, the field says why and F2PAD's
README.md lists it under Fidelity.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

#: The starts X_N^0 F2PAD can solve from; each is the observed image X with some pixels inpainted.
STARTS = {
    "mask": "the initial mask inpainted (the paper's start)",
    "region": "the dilated region R inpainted",
    "region_in_mask": "R's inpainting inside the initial mask, X in the rest of R",
}


@dataclass(frozen=True)
class F2PADSettings:
    """Every setting of F2PAD's refinement, its pixel prior and its calibration."""

    sparsity_weight: float = 0.01
    """lambda0; the LOG penalty's weight is lambda0 / (fraction of the image the initial mask covers, in (0, 1])."""
    log_eps: float = 0.05
    """Scale eps of the LOG penalty log(1 + |A| / eps), |A| the channel norm."""
    prior_weight: float = 0.01
    """Weight of the pixel prior (nearest-component squared Mahalanobis distance)."""
    smoothness_weight: float = 0.1
    """Weight of the total variation."""
    prior_components: int = 5
    """Most mixture components the variational-Bayes pixel prior may use."""
    prior_samples: int = 20000
    """Training pixels the prior is fitted on."""
    prior_reg_covar: float = 1e-3
    """Added to the prior's covariance diagonals."""
    num_candidates: int = 10
    """Memory-bank candidate neighbours per position, fixed at the initial estimate (PatchCore-like scorers)."""
    dilation: int = 8
    """Pixels the initial mask is grown by to give the optimised region R."""
    crop_margin: int = 32
    """Context pixels kept around R when cropping the images for the backbone."""
    reach: int = 16
    """Feature positions within this many pixels of R count in the loss."""
    mask_threshold: float = 0.1
    """A pixel is anomalous where |A| (median-filtered over ``median_size``) exceeds this."""
    median_size: int = 5
    """Window of the median filter on |A| before the threshold (odd; 1: none), so that a pixel is anomalous where
    most of its window is. 5 removes the speckle inside defects whose pixels partly
    share the normal colour and raises the mean IoU gain on both protocols and both models (README.md, Fidelity)."""
    colour_growth: float | None = 9.0
    """The refined mask grows into every connected region of pixels touching it whose prior cost (squared
    Mahalanobis distance to the nearest colour component, median-filtered over ``median_size``) exceeds this
    (``growth.py``); ``None``: no growth. 9: the colour a tint of 0.1 gives grey, at the prior's floor variance
    ``prior_reg_covar``; chosen on ``bench_f2pad.py`` (README.md, Fidelity)."""
    initial_threshold: float | None = None
    """Raw anomaly-map threshold of the initial mask; ``None``: the post-processor's F1-optimal pixel threshold."""
    lr: float = 0.01
    """Adan's learning rate."""
    clip: float = 0.03
    """Gradient clipping value."""
    kernel_size: int = 5
    """Neighbourhood of the gradient sharing."""
    sigma_space: float = 1.0
    """Spatial sigma of the sharing weights (pixels)."""
    sigma_color: float = 0.25
    """Colour sigma of the sharing weights ([0, 1] units)."""
    step_boost: float = 3.0
    """c of the adaptive step size 1 + c / (1 + |A| / eps)."""
    tolerance: float | None = None
    """Stop when the objective decreases by less than this per iteration; ``None``: the scorer's default (paper:
    0.1 for PaDiM, 0.05 otherwise)."""
    max_iterations: int = 50
    """Iteration cap of each main solve (one per start). 50: the masks after 50 iterations match those after
    1,200 within 1 IoU point (README.md, Fidelity)."""
    reestimate: bool = True
    """Re-estimate the normal image inside the final mask without the sparsity term."""
    reestimation_iterations: int = 25
    """Iteration cap of the re-estimation (as ``max_iterations``, measured with it)."""
    min_explained: float = 0.5
    """Do no harm: an image keeps the backbone's mask (and map) unless the recovered normal image, changed only
    inside the refined mask, removes at least this share of the anomaly score that the first start removes
    (``Refinement.explained``); 0 trusts every refinement."""
    starts: tuple[str, ...] = ("region", "region_in_mask")
    """The starts X_N^0 solved from (:data:`STARTS`); per image the solve with the lowest objective J is kept.
    Default: R inpainted and R's fill inside the initial mask only. ``("mask",)`` inpaints only the initial mask,
    as the paper's text reads, whose fill then comes from the mask's border: inside the defect wherever the
    coarse mask misses part of it (README.md, Fidelity)."""
    calibration_images: int = 0
    """Normal training images on which, when training ends, synthetic defects are drawn and the sparsity, prior
    and TV weights and the mask threshold chosen (``calibration.py``); 0 keeps the given weights. Opt-in: on
    bench_f2pad.py the chosen weights lowered IoU on the paper's protocol and did not raise it on realistic
    defects (README.md, Fidelity)."""
    calibration_veto: bool = False
    """If no choice beat the initial masks on the calibration's synthetic defects, keep every backbone mask."""
    share_gradients: bool = True
    """Local gradient sharing on (off gives plain Adan)."""
    replace_anomaly_map: bool = True
    """Put the map of |A| (mask threshold at 0.5) into ``anomaly_map``."""

    def __post_init__(self) -> None:
        if not isinstance(self.starts, str):  # YAML and checkpoints give lists; a string is refused below
            object.__setattr__(self, "starts", tuple(self.starts))
        check_starts(self.starts)
        check_median_size(self.median_size)
        if self.colour_growth is not None and not self.colour_growth > 0:
            raise ValueError(f"F2PAD: colour_growth must be a positive prior cost or None; got {self.colour_growth!r}.")

    def to_config(self) -> dict[str, Any]:
        """Plain data for the checkpoint."""
        config = asdict(self)
        config["starts"] = list(self.starts)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> F2PADSettings:
        """The settings a checkpoint saved; a setting it predates keeps its default."""
        names = setting_names()
        return cls(**{name: value for name, value in config.items() if name in names})


def setting_names() -> tuple[str, ...]:
    """The names of every setting, in declaration order."""
    return tuple(field.name for field in fields(F2PADSettings))


def check_median_size(size: int) -> None:
    """Raise ``ValueError`` naming ``median_size`` unless it is a positive odd integer."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"F2PAD: median_size must be a positive odd integer (1: no filter); got {size!r}.")


def check_starts(starts: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``starts`` unless it holds one or more known names."""
    unknown = [name for name in starts if name not in STARTS]
    if not starts or unknown or isinstance(starts, str):
        raise ValueError(f"F2PAD: starts must be a non-empty list of {sorted(STARTS)}; got {starts!r}.")
