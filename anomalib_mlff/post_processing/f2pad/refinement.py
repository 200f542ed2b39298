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
   initial-estimate quantities (PatchCore's candidate neighbours) and the feature-term scale g0
   (``scale_feature_term``) at the first start, so that every start minimises the same J; the sparsity
   weight is lambda0 / (fraction of the image the initial mask covers).
5. Minimise J over R with the optimiser from each start and keep the estimate with the lowest J; the mask is
   where the channel norm of A = X - X_N, median-filtered over ``median_size`` windows (:func:`denoise_magnitude`),
   exceeds ``mask_threshold``; the mask then grows into connected pixels of a colour the pixel prior rejects,
   at most ``growth_margin`` pixels beyond R (``colour_growth``, :mod:`growth`).
6. Re-estimation: minimise J again without the sparsity term, over the final mask only, to recover X_N.
7. Trust (:mod:`trust`): an image keeps its initial mask where the refined one explains too little of the score
   R's inpainting removes (``min_explained``) or lies mostly where it lowers no score (``max_unexplained_area``).
Images of another size than ``working_size`` are resized to it and the results resized back. Up to
``images_per_solve`` images are refined together, and with ``batch_starts`` every start of every image is one
row of a single batched solve; each row stops on its own (``optimizer.py``).
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
from .optimizer import GradientSharing, MaskRule, OptimizerSettings, check_finite, minimise
from .prior import PixelPrior
from .scorers import DifferentiableScorer
from .settings import F2PADSettings
from .trust import explained, unexplained_area
from .window import dilate, positions_touched


#: Images per solve on a GPU when ``images_per_solve`` is ``None``: each is a row per start of one batched backbone
#: pass with its graph kept for the backward pass, so the whole evaluation batch could exhaust a smaller GPU.
GPU_IMAGES_PER_SOLVE = 8


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


def refined_magnitude(
    observed: torch.Tensor, region: torch.Tensor, normal: torch.Tensor, median_size: int
) -> torch.Tensor:
    """|A| = |X - X_N| of step 5, median-filtered over ``median_size`` and kept inside ``region``, ``(B, H, W)``."""
    return denoise_magnitude(channel_norm(observed - normal), region, median_size)


def refined_mask_rule(settings: F2PADSettings) -> MaskRule:
    """The mask rule of step 5 (before colour growth): where :func:`refined_magnitude` exceeds ``mask_threshold``."""

    def mask_of(observed: torch.Tensor, region: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
        return refined_magnitude(observed, region, normal, settings.median_size) > settings.mask_threshold

    return mask_of


def initial_estimates(
    observed: torch.Tensor,
    initial_masks: torch.Tensor,
    region: torch.Tensor,
    inpainter: Inpainter,
    starts: tuple[str, ...],
) -> list[torch.Tensor]:
    """X_N^0 for each name in ``starts`` (``settings.STARTS``), ``(B, C, H, W)`` each; R is inpainted once."""
    inpainted = inpaint(observed, initial_masks, region, inpainter, starts)
    return [inpainted[name] for name in starts]


def inpaint(
    observed: torch.Tensor,
    initial_masks: torch.Tensor,
    region: torch.Tensor,
    inpainter: Inpainter,
    names: tuple[str, ...],
) -> dict[str, torch.Tensor]:
    """The fills of :data:`~.settings.STARTS` named in ``names`` (more where they come free), by name."""
    inpainted: dict[str, torch.Tensor] = {}
    if "mask" in names:
        inpainted["mask"] = inpainter(observed, initial_masks)
    if {"region", "region_in_mask"} & set(names):
        inpainted["region"] = inpainter(observed, region)
        inpainted["region_in_mask"] = torch.where(initial_masks[:, None], inpainted["region"], observed)
    return inpainted


@dataclass
class Refinement:
    """F2PAD's outputs for a batch.

    Attributes:
        pred_mask: refined masks ``(B, H, W)``.
        magnitude: channel norm of the anomalous part |A| ``(B, H, W)`` (zero outside R and the grown mask).
        normal_image: recovered normal images ``(B, C, H, W)`` in [0, 1].
        initial_normal_image: the start X_N^0 whose solve reached the lowest J, ``(B, C, H, W)``.
        iterations: optimiser iterations per image (all solves), ``(B,)``.
        explained: share of the anomaly score that R inpainted removes which the recovered normal image
            removes too, changing only the refined mask's pixels, ``(B,)`` (:func:`.trust.explained`).
        unexplained_area: share of the refined mask lying where it lowers no score, ``(B,)``
            (:func:`.trust.unexplained_area`).
        fallback: images whose refinement was not trusted (``explained < min_explained`` or
            ``unexplained_area > max_unexplained_area``) and whose ``pred_mask`` is the initial mask, ``(B,)`` bool.
    """

    pred_mask: torch.Tensor
    magnitude: torch.Tensor
    normal_image: torch.Tensor
    initial_normal_image: torch.Tensor
    iterations: torch.Tensor
    explained: torch.Tensor
    unexplained_area: torch.Tensor
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
            unexplained_area=torch.zeros(batch, dtype=images.dtype, device=images.device),
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
    todo = initial_masks.flatten(1).any(1).nonzero().flatten()
    size = tuple(images.shape[-2:])
    working_size = tuple(scorer.working_size(size) if working_size is None else working_size)
    per_solve = settings.images_per_solve or (1 if images.device.type == "cpu" else GPU_IMAGES_PER_SOLVE)
    groups = todo.split(per_solve) if len(todo) else ()  # split() of nothing gives one empty group
    for group in groups:  # one common crop per group; each image stops on its own
        observed, masks = images[group], initial_masks[group].bool()
        if working_size != size:
            observed = F.interpolate(observed, size=working_size, mode="bilinear", antialias=True).clamp(0, 1)
            masks = F.interpolate(masks[:, None].float(), size=working_size, mode="nearest")[:, 0] > 0
        try:
            refined = _refine_at_model_size(observed, masks, scorer, inpainter, prior, settings)
        except NonFiniteError as error:
            raise NonFiniteError(error.what, group[error.items].tolist()) from error
        if working_size != size:
            refined = _resize(refined, images[group], settings.mask_threshold)
        for name in _FIELDS:
            getattr(result, name)[group] = getattr(refined, name)
    untrusted = result.explained < settings.min_explained
    if settings.max_unexplained_area is not None:
        untrusted |= result.unexplained_area > settings.max_unexplained_area
    return result.fall_back(initial_masks, untrusted)


_FIELDS = (
    "pred_mask", "magnitude", "normal_image", "initial_normal_image", "iterations", "explained", "unexplained_area"
)


def _refine_at_model_size(
    observed: torch.Tensor,
    initial_masks: torch.Tensor,
    scorer: DifferentiableScorer,
    inpainter: Inpainter,
    prior: PixelPrior | None,
    settings: F2PADSettings,
) -> Refinement:
    """Steps 2-7 for images that all have a non-empty mask (the trust measures; the fallback is left to refine)."""
    region = dilate(initial_masks, settings.dilation)
    inpainted = inpaint(observed, initial_masks, region, inpainter, (*settings.starts, "region"))
    starts = [inpainted[name] for name in settings.starts]
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
    if settings.scale_feature_term:
        objective = replace(objective, feature_scale=calibrate_feature_scale(objective, start_crop))
    optimizer = OptimizerSettings.of(settings, scorer.tolerance)
    scores_observed = objective.position_scores(observed_crop)
    if settings.starts[0] == "region":  # R inpainted is the first start: its embedding is already at hand
        with torch.no_grad():
            score_region_inpainted = (scores(initial_embedding) * positions).flatten(1).sum(1)
    else:
        score_region_inpainted = objective.feature_score(window.crop(inpainted["region"]))
    normal, chosen, iterations = lowest_energy_solve(
        objective, [window.crop(start) for start in starts], observed_crop, region_crop, optimizer,
        settings.share_gradients, together=settings.batch_starts,
        mask_of=refined_mask_rule(settings),
    )
    start = torch.stack(starts)[chosen, torch.arange(len(chosen), device=chosen.device)]
    magnitude = refined_magnitude(observed_crop, region_crop, normal, settings.median_size)
    mask = magnitude > settings.mask_threshold
    if settings.colour_growth is not None and objective.prior is not None and mask.any():
        mask, magnitude = grow_into_colour_outliers(
            mask, magnitude, observed_crop, objective.prior, settings.colour_growth, settings.mask_threshold,
            settings.median_size, within=dilate(region_crop, settings.growth_margin),
        )
    if settings.reestimate and mask.any():
        recovery = replace(objective, region=mask, sparsity_weight=torch.zeros_like(objective.sparsity_weight))
        recovery_settings = replace(optimizer, max_iterations=settings.reestimation_iterations)
        normal, recovery_trace = minimise(
            recovery, normal, observed_crop, mask, recovery_settings, settings.share_gradients
        )
        iterations = iterations + recovery_trace.iterations
    recovered = torch.where(mask[:, None], normal, observed_crop)  # X changed only inside the refined mask
    drop = scores_observed - objective.position_scores(recovered)
    score_observed = scores_observed.flatten(1).sum(1)
    share = explained(score_observed, score_region_inpainted, score_observed - drop.flatten(1).sum(1))
    unexplained = unexplained_area(mask, drop, judged=score_observed > score_region_inpainted)
    return Refinement(
        pred_mask=window.paste(mask, torch.zeros_like(initial_masks)),
        magnitude=window.paste(magnitude, torch.zeros_like(initial_masks, dtype=observed.dtype)),
        normal_image=window.paste(normal, observed),
        initial_normal_image=start,
        iterations=iterations,
        explained=share,
        unexplained_area=unexplained,
        fallback=torch.zeros_like(share, dtype=torch.bool),
    )


def lowest_energy_solve(
    objective: Callable[[torch.Tensor], torch.Tensor],
    starts: list[torch.Tensor],
    observed: torch.Tensor,
    region: torch.Tensor,
    optimizer: OptimizerSettings,
    share: bool = True,
    together: bool = True,
    mask_of: MaskRule | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise ``objective`` from each start; per image the estimate with the lowest value (the first on a tie).

    ``together``: the starts are stacked into one batch and solved at once, each row stopping on its own, where the
    objective can be repeated (:meth:`.objective.Objective.repeat`); otherwise one after the other. ``mask_of``:
    the mask rule for ``mask_patience`` (:func:`refined_mask_rule`).

    Returns the estimate ``(B, C, H, W)``, the index of its start ``(B,)`` and the iterations of all solves ``(B,)``.
    """
    sharing = (  # the weights depend on the observed image and the region only: one set for every start
        GradientSharing(observed, region, optimizer.kernel_size, optimizer.sigma_space, optimizer.sigma_color)
        if share
        else None
    )
    batch = observed.shape[0]
    if together and len(starts) > 1 and hasattr(objective, "repeat"):
        count = len(starts)
        try:
            normal, trace = minimise(
                objective.repeat(count), torch.cat(starts), observed.repeat(count, 1, 1, 1),
                region.repeat(count, 1, 1), optimizer, share, sharing, mask_of,
            )
        except NonFiniteError as error:  # rows are (start, image) pairs: name the images
            raise NonFiniteError(error.what, sorted({item % batch for item in error.items})) from error
        chosen = trace.best.reshape(count, batch).argmin(0)
        normal = normal.reshape(count, batch, *normal.shape[1:])[chosen, torch.arange(batch, device=chosen.device)]
        return normal, chosen, trace.iterations.reshape(count, batch).sum(0)
    best_normal = best_value = None
    chosen = torch.zeros(batch, dtype=torch.long, device=observed.device)
    iterations = torch.zeros_like(chosen)
    for index, start in enumerate(starts):
        normal, trace = minimise(objective, start, observed, region, optimizer, share, sharing, mask_of)
        iterations = iterations + trace.iterations
        value = trace.best
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
        unexplained_area=refined.unexplained_area,
        fallback=refined.fallback,
    )
