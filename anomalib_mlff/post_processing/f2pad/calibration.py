"""F2PAD's weights per category without test masks: chosen on synthetic defects of normal images.

The paper grid-searches lambda0, the prior weight and the TV weight per category on the test masks,
which a user never has. Here they are chosen when training ends, on synthetic defects whose masks are
known by construction: the project's pseudo anomalies (CutPaste, CutPaste-Scar, confetti noise; not
flat-colour patches) drawn on normal images from the training batches. The initial masks come from the
model's own map at the F1-optimal threshold over those images (as the paper starts from the F1-optimal
mask), and a coordinate search keeps the weights whose refined masks have the highest mean IoU. The
|A| threshold of the mask is chosen with them: it does not change the main solve, so every solve is
scored at each threshold of :data:`MASK_THRESHOLD_FACTORS`. Solves run without the re-estimation (it
changes the recovered image, not the mask), without the trust rules (the weights are chosen for what the
refinement itself achieves) and for at most ``max_iterations`` (50 by default) and
:data:`CALIBRATION_ITERATIONS` iterations per start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from lightning import LightningModule

from anomalib_mlff.components.pseudo_anomaly import confetti_noise, cut_paste, cut_paste_scar

from .adaptation import anomaly_map_of, evaluating
from .inpaint import Inpainter
from .metrics import mean_mask_iou
from .prior import PixelPrior
from .refinement import refine
from .scorers import DifferentiableScorer
from .settings import F2PADSettings

#: Multipliers of the configured weight tried for each weight, in this order (coordinate search).
SEARCH: dict[str, tuple[float, ...]] = {
    "sparsity_weight": (0.3, 3.0),
    "prior_weight": (0.0,),
    "smoothness_weight": (3.0,),
}
#: Upper bound on the calibration's iteration cap, which is otherwise ``max_iterations``: with a long main cap (the
#: paper's 1,200) the search stays short, and most solves stop on their own before 150.
CALIBRATION_ITERATIONS = 150
#: Multipliers of the configured |A| threshold tried on every solve (they need no solve of their own).
MASK_THRESHOLD_FACTORS = (0.5, 1.0, 2.0)

_DEFECTS = (cut_paste, cut_paste_scar, confetti_noise)


def synthetic_defects(images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each [0, 1] image ``(B, C, H, W)`` with one pseudo anomaly (kinds in turn) and its mask ``(B, H, W)``."""
    generator = torch.Generator().manual_seed(seed)
    defective, masks = [], []
    for index, image in enumerate(images.cpu()):
        for _ in range(10):  # a draw may change no pixel (a patch pasted onto its twin): draw again
            changed, mask = _DEFECTS[index % len(_DEFECTS)](image, generator=generator)
            if mask.any():
                break
        defective.append(changed)
        masks.append(mask[0] > 0)
    return torch.stack(defective).to(images.device), torch.stack(masks).to(images.device)


def f1_optimal_masks(anomaly_maps: torch.Tensor, truths: torch.Tensor, candidates: int = 200) -> torch.Tensor:
    """Masks of ``anomaly_maps`` ``(B, H, W)`` at the one threshold with the best pixel F1 against ``truths``."""
    levels = torch.quantile(anomaly_maps.flatten().float()[:: max(1, anomaly_maps.numel() // 100_000)],
                            torch.linspace(0.5, 0.999, candidates, device=anomaly_maps.device))
    scores = torch.stack([2 * ((anomaly_maps > t) & truths).sum() / ((anomaly_maps > t).sum() + truths.sum())
                          for t in levels])
    return anomaly_maps > levels[int(scores.argmax())]


@dataclass(frozen=True)
class Calibration:
    """What the search chose and saw: the weights (and mask threshold), the initial masks' mean IoU, each trial's."""

    weights: dict[str, float]
    initial_iou: float
    trials: list[tuple[dict[str, float], float]]

    @property
    def refines(self) -> bool:
        """Whether the best refinement beat the initial masks; if not, F2PAD keeps the backbone's masks."""
        return max(score for _, score in self.trials) > self.initial_iou

    def to_config(self) -> dict:
        """Plain data for the checkpoint."""
        trials = [list(trial) for trial in self.trials]
        return {"weights": self.weights, "initial_iou": self.initial_iou, "trials": trials, "refines": self.refines}


def calibrate(
    normal_images: torch.Tensor,
    anomaly_map: Callable[[torch.Tensor], torch.Tensor],
    scorer: DifferentiableScorer,
    inpainter: Inpainter,
    prior: PixelPrior | None,
    settings: F2PADSettings,
    seed: int = 0,
) -> Calibration:
    """Choose the sparsity, prior and TV weights for ``settings`` on synthetic defects of ``normal_images``.

    ``anomaly_map`` maps [0, 1] images to the model's raw maps ``(B, H, W)``. Each weight in turn is
    multiplied by the factors in :data:`SEARCH`, keeping a change only if it raises the mean IoU; ties keep
    the configured weight. Returns the chosen weights and ``mask_threshold``. Deterministic for a given seed.
    """
    images, truths = synthetic_defects(normal_images, seed)
    with torch.no_grad():
        initial = f1_optimal_masks(anomaly_map(images), truths)

    base_threshold = settings.mask_threshold
    thresholds = [base_threshold * factor for factor in MASK_THRESHOLD_FACTORS]

    def solve(candidate: F2PADSettings) -> list[tuple[dict[str, float], float]]:
        """Mean IoU of the candidate's masks at each threshold, with the weights that gave it."""
        quick = replace(
            candidate,
            reestimate=False,
            min_explained=0.0,
            max_unexplained_area=None,
            max_iterations=min(candidate.max_iterations, CALIBRATION_ITERATIONS),
        )
        magnitude = refine(images, initial, scorer, inpainter, prior, quick).magnitude
        return [
            ({**_weights(candidate), "mask_threshold": threshold}, mean_mask_iou(magnitude > threshold, truths))
            for threshold in thresholds
        ]

    trials = solve(settings)
    best_weights, best_iou = max(trials, key=lambda trial: trial[1])  # first of equals: the configured threshold
    current = settings
    for name, factors in SEARCH.items():
        base = getattr(current, name)
        for factor in factors:
            candidate = replace(current, **{name: base * factor})
            results = solve(candidate)
            trials.extend(results)
            weights, score = max(results, key=lambda trial: trial[1])
            if score > best_iou:
                best_weights, best_iou, current = weights, score, candidate
    return Calibration(best_weights, mean_mask_iou(initial, truths), trials)


def calibrate_model(
    pl_module: LightningModule,
    normal_images: torch.Tensor,
    scorer: DifferentiableScorer,
    inpainter: Inpainter,
    prior: PixelPrior | None,
    settings: F2PADSettings,
) -> Calibration:
    """:func:`calibrate` with a Lightning module's model (in eval mode, gradients on) on its device."""
    with evaluating(pl_module.model), torch.inference_mode(False), torch.enable_grad():
        images = normal_images.to(pl_module.device)
        return calibrate(images, anomaly_map_of(pl_module), scorer, inpainter, prior, settings)


def _weights(settings: F2PADSettings) -> dict[str, float]:
    return {name: float(getattr(settings, name)) for name in SEARCH}
