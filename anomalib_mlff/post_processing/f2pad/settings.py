"""F2PAD's settings: one frozen object, its defaults written here only.

:class:`~anomalib_mlff.post_processing.f2pad.F2PAD` takes a :class:`F2PADSettings` and every field as a flat
constructor argument (anomalib's CLI and YAML need them; ``arguments.py`` builds its signature from these
fields) and saves and restores the object whole with the checkpoint. :func:`refine` takes the same object.
Adding a setting is adding a field here (with its docstring). Pixel quantities are in [0, 1] pixel units and
pixels at the model's input size; where a default differs from the paper, the field says why and F2PAD's
README.md lists it under Fidelity.

The defaults are the project's method. Where it departs from the paper's procedure the departure is a setting
whose docstring says so, and the preset ``"paper"`` (:data:`PRESETS`, ``F2PADSettings.paper()``,
``F2PAD(preset="paper")``) sets every one of them back to the paper's choice.
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
    """Window of the median filter on |A| before the threshold (odd; 1: none, the paper's mask rule), so that a
    pixel is anomalous where most of its window is. 5 removes the speckle inside defects whose pixels partly
    share the normal colour and raises the mean IoU gain on both protocols and both models (README.md, Fidelity)."""
    colour_growth: float | None = 9.0
    """The refined mask grows into every connected region of pixels touching it whose prior cost (squared
    Mahalanobis distance to the nearest colour component, median-filtered over ``median_size``) exceeds this
    (``growth.py``); ``None``: no growth. 9: the colour a tint of 0.1 gives grey, at the prior's floor variance
    ``prior_reg_covar``; chosen on ``bench_f2pad.py`` (README.md, Fidelity). Not in the paper (``None``)."""
    growth_margin: int = 32
    """Colour growth reaches at most this many pixels beyond R, so the map is 0 outside R plus this margin whatever
    the scorer (whole-image scorers included). 32: the default ``crop_margin``, the context cropping scorers see."""
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
    stop_on_raw_change: bool = False
    """The paper's stopping rule: stop when J's raw decrease between two consecutive iterations is below
    ``tolerance``. ``False``: when the best J's mean decrease over the last 10 iterations is, since Adan's first,
    sign-like steps trip the paper's rule at once (``optimizer.py``)."""
    max_iterations: int = 50
    """Iteration cap of each main solve (one per start); the paper's is 1,200. 50: the masks after 50 iterations
    matched those after 1,200 within 1 IoU point at a quarter of the time (README.md, Fidelity)."""
    mask_patience: int | None = 5
    """A main solve also stops once the mask of its best estimate (the ``mask_threshold`` rule on |A|, before colour
    growth) has changed in at most ``mask_change`` of its pixels over this many iterations: the objective still
    falls, but only by polishing the normal image, which the re-estimation does anyway. ``None``: only the
    objective's rule stops a solve. Not in the paper (``None``)."""
    mask_change: float = 0.01
    """Share of the mask's pixels that may still change over ``mask_patience`` iterations of a settled solve. 0.01:
    on ``bench_f2pad.py`` the IoU stayed within 0.7 of the unstopped solve's, where 0.02 lost up to 1.8."""
    batch_starts: bool = True
    """Solve all starts as one batch (one backbone pass per iteration for every start and image, each stopping on
    its own); ``False``: one start after the other, with a start's share of the memory. Same results up to float
    rounding (README.md, GPU and batching)."""
    images_per_solve: int | None = None
    """Images of a batch refined together, on one common crop size, each stopping on its own; 1: each image alone on
    its own crop. The common crop holds the largest region of the group, so smaller regions get more context and
    cost more. ``None``: one at a time on a CPU, where a batched pass costs as much as the passes it replaces and the
    larger crop adds work; up to 8 at a time on a GPU (``refinement.GPU_IMAGES_PER_SOLVE``)."""
    reestimate: bool = True
    """Re-estimate the normal image inside the final mask without the sparsity term."""
    reestimation_iterations: int = 10
    """Iteration cap of the re-estimation. It changes the recovered normal image and the trust measures, not the
    mask; 10: on ``bench_f2pad.py`` (brick) the IoU matched that after 25 to the last digit. The paper states no
    separate cap: it solves (12) again, under its one cap of 1,200."""
    min_explained: float = 0.5
    """Do no harm: an image keeps the backbone's mask (and map) unless the recovered normal image, changed only
    inside the refined mask, removes at least this share of the anomaly score that R inpainted removes
    (``Refinement.explained``); 0 trusts every refinement. Not in the paper (0)."""
    max_unexplained_area: float | None = 0.5
    """Do no harm: an image keeps the backbone's mask (and map) if more than this share of its refined mask lies
    where the recovered normal image lowered no score (``Refinement.unexplained_area``): a mask grown far beyond
    what the removed score explains, which ``min_explained`` cannot see (adding pixels only raises it).
    ``None``: no such limit. Not in the paper (``None``)."""
    starts: tuple[str, ...] = ("region", "region_in_mask")
    """The starts X_N^0 solved from (:data:`STARTS`); per image the solve with the lowest objective J is kept.
    Default: R inpainted and R's fill inside the initial mask only. ``("mask",)`` inpaints only the initial mask,
    the paper's start, whose fill then comes from the mask's border: inside the defect wherever the coarse mask
    misses part of it (README.md, Fidelity)."""
    scale_feature_term: bool = True
    """Divide the feature term by g0, the median feature-gradient norm over R at the start (``objective.py``), so
    that the pixel-level weights compare with a feature gradient of 1 whatever the backbone. ``False``: the
    paper's unscaled sum of scores."""
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

    @classmethod
    def from_preset(cls, name: str | None, **overrides: Any) -> F2PADSettings:  # noqa: ANN401
        """The settings of preset ``name`` (:data:`PRESETS`; ``None``: the defaults), with ``overrides`` on top."""
        if name is not None and name not in PRESETS:
            raise ValueError(f"F2PAD: preset must be one of {sorted(PRESETS)} or None; got {name!r}.")
        return cls(**{**PRESETS.get(name, {}), **overrides})

    @classmethod
    def paper(cls, **overrides: Any) -> F2PADSettings:  # noqa: ANN401
        """F2PAD as published (:data:`PAPER`), with ``overrides`` on top."""
        return cls.from_preset("paper", **overrides)

    def __post_init__(self) -> None:
        if not isinstance(self.starts, str):  # YAML and checkpoints give lists; a string is refused below
            object.__setattr__(self, "starts", tuple(self.starts))
        check_starts(self.starts)
        check_median_size(self.median_size)
        if self.colour_growth is not None and not self.colour_growth > 0:
            raise ValueError(f"F2PAD: colour_growth must be a positive prior cost or None; got {self.colour_growth!r}.")
        if isinstance(self.growth_margin, bool) or not isinstance(self.growth_margin, int) or self.growth_margin < 0:
            raise ValueError(f"F2PAD: growth_margin must be a non-negative integer; got {self.growth_margin!r}.")
        for name in ("mask_patience", "images_per_solve"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"F2PAD: {name} must be a positive integer or None; got {value!r}.")
        if not 0 <= self.mask_change <= 1:
            raise ValueError(f"F2PAD: mask_change must be a share in [0, 1]; got {self.mask_change!r}.")
        if self.max_unexplained_area is not None and not self.max_unexplained_area >= 0:
            raise ValueError(
                f"F2PAD: max_unexplained_area must be a share >= 0 or None; got {self.max_unexplained_area!r}."
            )

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


#: The paper's procedure (Cao et al., III-D/E, IV-A): every setting in which the project's defaults depart from it.
PAPER: dict[str, Any] = {
    "starts": ("mask",),  # one start: the initial mask inpainted
    "stop_on_raw_change": True,  # stop on J's raw decrease between two iterations
    "max_iterations": 1200,  # the paper's cap
    "reestimation_iterations": 1200,  # the re-estimation solves (12) again, under the same cap
    "median_size": 1,  # the mask is where |A| exceeds the threshold, unfiltered
    "colour_growth": None,  # the mask stays inside R
    "min_explained": 0.0,  # every refinement replaces the backbone's mask
    "max_unexplained_area": None,
    "mask_patience": None,  # only the objective's rule stops a solve
    "scale_feature_term": False,  # the feature term is the plain sum of scores
}

#: Named presets: the settings each changes from the defaults.
PRESETS: dict[str, dict[str, Any]] = {"paper": PAPER}


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
