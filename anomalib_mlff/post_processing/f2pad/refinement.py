"""The F2PAD procedure on a batch of [0, 1] images and their initial masks (paper III-E).

1. Images whose initial mask is empty are returned at once, unchanged, with an empty mask.
2. Dilate the initial mask: the region R that is optimised.
3. The starts X_N^0 (``starts``, see ``settings.STARTS``). Inpainting R fills from pixels outside the dilated
   mask; inpainting the initial mask alone fills from its border, which lies inside the defect wherever the
   coarse mask is smaller than or offset from it, so X_N^0 keeps the defect's colour there and the refined
   mask shrinks. R inpainted everywhere starts normal pixels of the ring
   R minus the mask away from X too, which the sparsity term must pull back; R's fill inside the mask only
   starts them at X. J is not convex, so with several starts each is minimised and the lowest J is kept.
4. Cut a common crop around R (the features outside it cannot change); fix the model's
   initial-estimate quantities (PatchCore's candidate neighbours) and the feature-term scale at the first
   start, so that every start minimises the same J; the sparsity weight is lambda0 / (fraction of the image
   the initial mask covers).
5. Minimise J over R with the optimiser from each start and keep the estimate with the lowest J; the mask is
   where the channel norm of A = X - X_N, median-filtered over ``median_size`` windows (:func:`denoise_magnitude`),
   exceeds ``mask_threshold``; the mask then grows into connected pixels of a colour the pixel prior rejects
   (``colour_growth``, :mod:`growth`).
6. Re-estimation: minimise J again without the sparsity term, over the final mask only, to recover X_N.
Images of another size than ``working_size`` are resized to it and the results resized back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from kornia.filters import median_blur
from torch.nn import functional as F  # noqa: N812

from .growth import grow_into_colour_outliers
from .inpaint import Inpainter
from .objective import NonFiniteError, Objective, calibrate_feature_scale, channel_norm
from .optimizer import GradientSharing, OptimizerSettings, check_finite, minimise
from .prior import PixelPrior
from .scorers import DifferentiableScorer
from .settings import F2PADSettings
from .window import dilate, positions_touched


def denoise_magnitude(magnitude: torch.Tensor, region: torch.Tensor, size: int) -> torch.Tensor:
    """|A| ``(B, H, W)`` median-filtered over ``size`` x ``size`` windows and kept inside ``region``.

    The median exceeds the mask threshold exactly where most of a pixel's window does, so the mask loses the
    speckle of single pixels whose colour a defect happens to share with the normal surface (a hole's grey
    crumbs, a worn patch's texture) and the isolated pixels the optimiser leaves in the ring, while the map
    keeps anomalib's convention that its 0.5 level is the mask. ``size`` 1: |A| inside ``region``, unfiltered.
    """
    inside = magnitude * region
    if size == 1:
        return inside
    return median_blur(inside[:, None], size)[:, 0] * region  # the median may spread past R's edge


def initial_estimates(
    observed: torch.Tensor,
    initial_masks: torch.Tensor,
    region: torch.Tensor,
    inpainter: Inpainter,
    starts: tuple[str, ...],
) -> list[torch.Tensor]:
    """X_N^0 for each name in ``starts`` (``settings.STARTS``), ``(B, C, H, W)`` each; R is inpainted once."""
    inpainted: dict[str, torch.Tensor] = {}
    if "mask" in starts:
        inpainted["mask"] = inpainter(observed, initial_masks)
    if {"region", "region_in_mask"} & set(starts):
        inpainted["region"] = inpainter(observed, region)
        inpainted["region_in_mask"] = torch.where(initial_masks[:, None], inpainted["region"], observed)
    return [inpainted[name] for name in starts]


@dataclass
class Refinement:
    """F2PAD's outputs for a batch.

    Attributes:
        pred_mask: refined masks ``(B, H, W)``.
        magnitude: channel norm of the anomalous part |A| ``(B, H, W)`` (zero outside R and the grown mask).
        normal_image: recovered normal images ``(B, C, H, W)`` in [0, 1].
        initial_normal_image: the start X_N^0 whose solve reached the lowest J, ``(B, C, H, W)``.
        iterations: optimiser iterations per image (all solves), ``(B,)``.
        explained: share of the anomaly score that the first start X_N^0 removes which the recovered
            normal image removes too, changing only the refined mask's pixels, ``(B,)`` (see :func:`explained`).
        fallback: images whose refinement was not trusted (``explained < min_explained``) and whose
            ``pred_mask`` is the initial mask, ``(B,)`` bool.
    """

    pred_mask: torch.Tensor
    magnitude: torch.Tensor
    normal_image: torch.Tensor
    initial_normal_image: torch.Tensor
    iterations: torch.Tensor
    explained: torch.Tensor
    fallback: torch.Tensor

    @classmethod
    def unchanged(cls, images: torch.Tensor) -> Refinement:
        """The result for images with nothing to refine."""
        batch, _, height, width = images.shape
        return cls(
            pred_mask=torch.zeros(batch, height, width, dtype=torch.bool, device=images.device),
            magnitude=torch.zeros(batch, height, width, dtype=images.dtype, device=images.device),
            normal_image=images.clone(),
            initial_normal_image=images.clone(),
            iterations=torch.zeros(batch, dtype=torch.long, device=images.device),
            explained=torch.ones(batch, dtype=images.dtype, device=images.device),
            fallback=torch.zeros(batch, dtype=torch.bool, device=images.device),
        )

    def fall_back(self, initial_masks: torch.Tensor, which: torch.Tensor) -> Refinement:
        """The result with the images ``which`` (``(B,)`` bool) kept at ``initial_masks`` and marked as fallbacks."""
        pred_mask = torch.where(which[:, None, None], initial_masks.bool(), self.pred_mask)
        return replace(self, pred_mask=pred_mask, fallback=self.fallback | which)

    def anomaly_map(self, mask_threshold: float) -> torch.Tensor:
        """|A| mapped into [0, 1) as ``|A| / (|A| + threshold)``: the mask threshold lands on 0.5."""
        return self.magnitude / (self.magnitude + mask_threshold)


def refine(
    images: torch.Tensor,
    initial_masks: torch.Tensor,
    scorer: DifferentiableScorer,
    inpainter: Inpainter,
    prior: PixelPrior | None,
    settings: F2PADSettings,
    working_size: tuple[int, int] | None = None,
) -> Refinement:
    """Refine ``initial_masks`` ``(B, H, W)`` of [0, 1] ``images`` ``(B, C, H, W)``; see the module docstring."""
    check_finite("the images", images)
    result = Refinement.unchanged(images)
    todo = initial_masks.flatten(1).any(1).nonzero().flatten().tolist()
    size = tuple(images.shape[-2:])
    working_size = tuple(scorer.working_size(size) if working_size is None else working_size)
    for index in todo:  # one image at a time: its own crop and its own stopping point
        observed, masks = images[index : index + 1], initial_masks[index : index + 1].bool()
        if working_size != size:
            observed = F.interpolate(observed, size=working_size, mode="bilinear", antialias=True).clamp(0, 1)
            masks = F.interpolate(masks[:, None].float(), size=working_size, mode="nearest")[:, 0] > 0
        try:
            refined = _refine_at_model_size(observed, masks, scorer, inpainter, prior, settings)
        except NonFiniteError as error:
            raise NonFiniteError(error.what, [index]) from error
        if working_size != size:
            refined = _resize(refined, images[index : index + 1], settings.mask_threshold)
        for name in _FIELDS:
            getattr(result, name)[index] = getattr(refined, name)[0]
    return result.fall_back(initial_masks, result.explained < settings.min_explained)


_FIELDS = ("pred_mask", "magnitude", "normal_image", "initial_normal_image", "iterations", "explained")


def explained(observed: torch.Tensor, start: torch.Tensor, recovered: torch.Tensor) -> torch.Tensor:
    """Share of the score drop ``observed - start`` that ``recovered`` achieves, in [0, 1]; ``(B,)``.

    ``observed``, ``start`` and ``recovered`` are the feature term L at the input X, at the inpainted
    start X_N^0 and at the recovered normal image X_N. X_N may differ from X only inside the refined mask
    (the re-estimation frees exactly those pixels), so a share near 1 says the refined mask holds what made
    the region anomalous, and a share near 0 that the anomaly lies (mostly) outside it. Where inpainting
    lowers no score, nothing is to be explained and the share is 1.
    """
    drop = observed - start
    share = (observed - recovered) / drop.clamp_min(1e-12)
    return torch.where(drop > 0, share.clamp(0, 1), torch.ones_like(share))


def _refine_at_model_size(
    observed: torch.Tensor,
    initial_masks: torch.Tensor,
    scorer: DifferentiableScorer,
    inpainter: Inpainter,
    prior: PixelPrior | None,
    settings: F2PADSettings,
) -> Refinement:
    """Steps 2-6 for images that all have a non-empty mask."""
    region = dilate(initial_masks, settings.dilation)
    starts = initial_estimates(observed, initial_masks, region, inpainter, settings.starts)
    window = scorer.window(region, settings.crop_margin)
    observed_crop, region_crop = window.crop(observed), window.crop(region)
    start_crop = window.crop(starts[0])
    with torch.no_grad():
        initial_embedding = scorer.embed(start_crop)
    positions = positions_touched(region_crop, scorer.stride, settings.reach)
    scores = scorer.prepare(initial_embedding, window, positions)
    anomaly_sizes = initial_masks.flatten(1).float().mean(1).to(observed.dtype)
    objective = Objective(
        scorer=scorer,
        scores=scores,
        observed=observed_crop,
        region=region_crop,
        positions=positions,
        feature_scale=torch.ones_like(anomaly_sizes),
        sparsity_weight=settings.sparsity_weight / anomaly_sizes,
        eps=settings.log_eps,
        prior=prior if prior is not None and prior.is_fitted else None,
        prior_weight=settings.prior_weight,
        smoothness_weight=settings.smoothness_weight,
    )
    objective = replace(objective, feature_scale=calibrate_feature_scale(objective, start_crop))
    optimizer = OptimizerSettings.of(settings, scorer.tolerance)
    score_observed = objective.feature_score(observed_crop)
    with torch.no_grad():  # L at the start, from the embedding the candidates were chosen on
        score_start = (scores(initial_embedding) * positions).flatten(1).sum(1)
    normal, chosen, iterations = lowest_energy_solve(
        objective, [window.crop(start) for start in starts], observed_crop, region_crop, optimizer,
        settings.share_gradients,
    )
    start = torch.stack(starts)[chosen, torch.arange(len(chosen), device=chosen.device)]
    magnitude = denoise_magnitude(channel_norm(observed_crop - normal), region_crop, settings.median_size)
    mask = magnitude > settings.mask_threshold
    if settings.colour_growth is not None and objective.prior is not None and mask.any():
        mask, magnitude = grow_into_colour_outliers(
            mask, magnitude, observed_crop, objective.prior, settings.colour_growth, settings.mask_threshold,
            settings.median_size,
        )
    if settings.reestimate and mask.any():
        recovery = replace(objective, region=mask, sparsity_weight=torch.zeros_like(objective.sparsity_weight))
        recovery_settings = replace(optimizer, max_iterations=settings.reestimation_iterations)
        normal, recovery_trace = minimise(
            recovery, normal, observed_crop, mask, recovery_settings, settings.share_gradients
        )
        iterations = iterations + recovery_trace.iterations
    recovered = torch.where(mask[:, None], normal, observed_crop)  # X changed only inside the refined mask
    share = explained(score_observed, score_start, objective.feature_score(recovered))
    return Refinement(
        pred_mask=window.paste(mask, torch.zeros_like(initial_masks)),
        magnitude=window.paste(magnitude, torch.zeros_like(initial_masks, dtype=observed.dtype)),
        normal_image=window.paste(normal, observed),
        initial_normal_image=start,
        iterations=iterations,
        explained=share,
        fallback=torch.zeros_like(share, dtype=torch.bool),
    )


def lowest_energy_solve(
    objective: Callable[[torch.Tensor], torch.Tensor],
    starts: list[torch.Tensor],
    observed: torch.Tensor,
    region: torch.Tensor,
    optimizer: OptimizerSettings,
    share: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise ``objective`` from each start; per image the estimate with the lowest value.

    Returns the estimate ``(B, C, H, W)``, the index of its start ``(B,)`` and the iterations of all solves ``(B,)``.
    """
    sharing = (  # the weights depend on the observed image and the region only: one set for every start
        GradientSharing(observed, region, optimizer.kernel_size, optimizer.sigma_space, optimizer.sigma_color)
        if share
        else None
    )
    best_normal = best_value = None
    chosen = torch.zeros(observed.shape[0], dtype=torch.long, device=observed.device)
    iterations = torch.zeros_like(chosen)
    for index, start in enumerate(starts):
        normal, trace = minimise(objective, start, observed, region, optimizer, share, sharing)
        iterations = iterations + trace.iterations
        value = trace.values.amin(0)  # J at the returned estimate, which is each image's best iterate
        if best_value is None:
            best_normal, best_value = normal, value
            continue
        lower = value < best_value
        best_normal = torch.where(lower[:, None, None, None], normal, best_normal)
        best_value = torch.where(lower, value, best_value)
        chosen = torch.where(lower, torch.full_like(chosen, index), chosen)
    return best_normal, chosen, iterations


def _resize(refined: Refinement, observed: torch.Tensor, mask_threshold: float) -> Refinement:
    """Bring a refinement made at the model's size back to the images' size."""
    size = observed.shape[-2:]
    magnitude = F.interpolate(refined.magnitude[:, None], size=size, mode="bilinear")[:, 0].clamp_min(0)
    mask = magnitude > mask_threshold

    def restore(image: torch.Tensor) -> torch.Tensor:
        resized = F.interpolate(image, size=size, mode="bilinear").clamp(0, 1)
        return torch.where(mask[:, None], resized, observed)

    return Refinement(
        pred_mask=mask,
        magnitude=magnitude,
        normal_image=restore(refined.normal_image),
        initial_normal_image=restore(refined.initial_normal_image),
        iterations=refined.iterations,
        explained=refined.explained,
        fallback=refined.fallback,
    )
