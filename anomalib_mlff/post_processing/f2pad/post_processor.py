"""F2PAD as an anomalib post-processor: ``Patchcore(post_processor=F2PAD())``.

The forward pass (and so every exported ONNX/OpenVINO graph) is plain ``PostProcessor``: it
normalises and thresholds. The refinement needs the image, the model's backbone and autograd, so it
runs at Lightning hook level, after the usual post-processing of each test or predict batch:

- training batches: pixels are sampled for the pixel prior (fitted when training ends) and the model's
  input size is recorded;
- test / predict batches: the backbone's mask at its F1-optimal threshold (or ``initial_threshold``)
  is refined; ``pred_mask`` becomes F2PAD's mask, ``anomaly_map`` the map of |A| (unless
  ``replace_anomaly_map=False``), and the batch gains ``initial_mask`` (the backbone's mask) and
  ``normal_image`` (the recovered normal image, [0, 1] pixels at the batch's image size).

Pixel values: the batch holds pre-processor-normalised images; F2PAD un-normalises them and works on
[0, 1] pixels (valid range, LOG scale, prior, colour weights and mask threshold are all in those
units), normalising again only where the backbone sees the image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.post_processing import PostProcessor
from lightning import LightningModule, Trainer
from torch.nn import functional as F  # noqa: N812

from anomalib_mlff.components.normalization import PixelRange

from .calibration import calibrate
from .inpaint import Inpainter, build_inpainter
from .objective import NonFiniteError
from .optimizer import OptimizerSettings, check_finite
from .prior import PixelPrior
from .refinement import Refinement, RefinementSettings, check_median_size, check_starts, refine
from .scorers import build_scorer, scorer_class_for
from .visualization import refinement_figure

logger = logging.getLogger(__name__)


class F2PAD(PostProcessor):
    """Refines a feature-based model's masks to pixel accuracy (F2PAD, Cao et al.).

    Defaults are the paper's where it gives them; pixel quantities are in [0, 1] pixel units and
    pixels at the model's input size.

    Args:
        sparsity_weight: lambda0; the LOG penalty's weight is lambda0 / (fraction of the image's pixels the
            initial mask covers, in (0, 1]).
        log_eps: scale eps of the LOG penalty log(1 + |A| / eps), |A| the channel norm.
        prior_weight: weight of the pixel prior (nearest-component squared Mahalanobis distance).
        smoothness_weight: weight of the total variation.
        prior_components: most mixture components the variational-Bayes fit may use.
        prior_samples: training pixels the prior is fitted on.
        prior_reg_covar: added to the prior's covariance diagonals.
        num_candidates: PatchCore's candidate neighbours per position, fixed at the initial estimate.
        dilation: pixels the initial mask is grown by to give the optimised region.
        crop_margin: context pixels kept around the region when cropping the images for the backbone.
        reach: feature positions within this many pixels of the region count in the loss.
        mask_threshold: a pixel is anomalous where |A| (median-filtered, ``median_size``) exceeds this.
        median_size: window of the median filter on |A| before the threshold (odd; 1: none), so that a pixel is
            anomalous where most of its window is. 5: on the seed-1 sweep it removed the speckle inside defects whose
            pixels partly share the normal colour (benchmarks/README.md) and raised the mean IoU gain on both
            protocols and both models.
        initial_threshold: raw anomaly-map threshold of the initial mask; ``None`` uses the post-processor's
            F1-optimal pixel threshold.
        lr: Adan's learning rate.
        clip: gradient clipping value.
        kernel_size: neighbourhood of the gradient sharing.
        sigma_space: spatial sigma of the sharing weights (pixels).
        sigma_color: colour sigma of the sharing weights ([0, 1] units).
        step_boost: c of the adaptive step size 1 + c / (1 + |A| / eps).
        tolerance: stop when the objective decreases by less than this per iteration; ``None``: the scorer's
            default (paper: 0.1 for PaDiM, 0.05 otherwise).
        max_iterations: iteration cap of each main solve (one per start). 50: on the seed-1 sweep
            (benchmarks/README.md) the masks after 50 iterations matched those after 1,200 within 1 IoU point.
        reestimate: re-estimate the normal image inside the final mask without the sparsity term.
        reestimation_iterations: iteration cap of the re-estimation (25; same sweep).
        min_explained: do no harm: an image keeps the backbone's mask (and its map) unless the recovered
            normal image, changed only inside the refined mask, removes at least this share of the anomaly
            score that the first start X_N^0 removes (``Refinement.explained``); 0 trusts every refinement.
        starts: the starts X_N^0 solved from (``refinement.STARTS``); per image the solve with the lowest
            objective J is kept. Default: the dilated region R inpainted (``"region"``) and R's fill inside the
            initial mask only (``"region_in_mask"``). ``["mask"]`` inpaints only the initial mask, as the
            paper's text reads, whose fill then comes from the mask's border: inside the defect wherever the
            coarse mask misses part of it (benchmarks/README.md).
        calibration_images: normal training images on which, when training ends, synthetic defects are drawn
            and the sparsity, prior and TV weights and the mask threshold are chosen (see ``calibration.py``);
            0 (default) keeps the given weights. Opt-in: on bench_f2pad.py the chosen weights lowered IoU on
            the paper's protocol and did not raise it on realistic defects (benchmarks/README.md).
        calibration_veto: if no choice beat the initial masks on the calibration's synthetic defects
            (``calibration["refines"]`` false), every image keeps the backbone's mask.
        share_gradients: local gradient sharing on (off gives plain Adan).
        inpainter: ``"telea"``, ``"ns"``, ``"biharmonic"`` or an inpainter such as ``MAEInpainter``.
        replace_anomaly_map: put the map of |A| (mask threshold at 0.5) into ``anomaly_map``.
        visualization_dir: if set, save image / recovered image / mask side by side there per test image.
        enabled: refine at all (``False``: plain ``PostProcessor``).
        **kwargs: ``PostProcessor`` arguments (normalisation, thresholding, sensitivities).
    """

    def __init__(
        self,
        sparsity_weight: float = 0.01,
        log_eps: float = 0.05,
        prior_weight: float = 0.01,
        smoothness_weight: float = 0.1,
        prior_components: int = 5,
        prior_samples: int = 20000,
        prior_reg_covar: float = 1e-3,
        num_candidates: int = 10,
        dilation: int = 8,
        crop_margin: int = 32,
        reach: int = 16,
        mask_threshold: float = 0.1,
        median_size: int = 5,
        initial_threshold: float | None = None,
        lr: float = 0.01,
        clip: float = 0.03,
        kernel_size: int = 5,
        sigma_space: float = 1.0,
        sigma_color: float = 0.25,
        step_boost: float = 3.0,
        tolerance: float | None = None,
        max_iterations: int = 50,
        reestimate: bool = True,
        reestimation_iterations: int = 25,
        min_explained: float = 0.5,
        starts: Sequence[str] = ("region", "region_in_mask"),
        calibration_images: int = 0,
        calibration_veto: bool = False,
        share_gradients: bool = True,
        inpainter: str | Inpainter = "telea",
        replace_anomaly_map: bool = True,
        visualization_dir: str | Path | None = None,
        enabled: bool = True,
        **kwargs: Any,  # noqa: ANN401
    ) -> None:
        super().__init__(**kwargs)
        self.sparsity_weight = sparsity_weight
        self.log_eps = log_eps
        self.prior_weight = prior_weight
        self.smoothness_weight = smoothness_weight
        self.prior_samples = prior_samples
        self.num_candidates = num_candidates
        self.dilation = dilation
        self.crop_margin = crop_margin
        self.reach = reach
        self.mask_threshold = mask_threshold
        check_median_size(median_size)
        self.median_size = median_size
        self.initial_threshold = initial_threshold
        self.lr = lr
        self.clip = clip
        self.kernel_size = kernel_size
        self.sigma_space = sigma_space
        self.sigma_color = sigma_color
        self.step_boost = step_boost
        self.tolerance = tolerance
        self.max_iterations = max_iterations
        self.reestimate = reestimate
        self.reestimation_iterations = reestimation_iterations
        self.min_explained = min_explained
        check_starts(starts)
        self.starts = tuple(starts)
        self.calibration_images = calibration_images
        self.calibration_veto = calibration_veto
        self.calibration: dict[str, Any] | None = None
        self._calibration_samples: list[torch.Tensor] = []
        self.share_gradients = share_gradients
        self.inpainter = build_inpainter(inpainter)
        self.replace_anomaly_map = replace_anomaly_map
        self.visualization_dir = Path(visualization_dir) if visualization_dir is not None else None
        self.enabled = enabled
        self.pixel_prior = PixelPrior(n_components=prior_components, reg_covar=prior_reg_covar)
        self.model_input_size: tuple[int, int] | None = None
        self._pixel_samples: list[torch.Tensor] = []
        self._warned: set[str] = set()  # warnings given (each once per post-processor)

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        return (
            *super()._checkpoint_config_keys,
            "sparsity_weight",
            "log_eps",
            "prior_weight",
            "smoothness_weight",
            "num_candidates",
            "dilation",
            "crop_margin",
            "reach",
            "mask_threshold",
            "median_size",
            "initial_threshold",
            "lr",
            "clip",
            "kernel_size",
            "sigma_space",
            "sigma_color",
            "step_boost",
            "tolerance",
            "max_iterations",
            "reestimate",
            "reestimation_iterations",
            "min_explained",
            "starts",
            "calibration_images",
            "calibration_veto",
            "calibration",
            "share_gradients",
            "replace_anomaly_map",
            "enabled",
        )

    def checkpoint_config(self) -> dict[str, Any]:
        """Settings, the fitted pixel prior and the model's input size, as plain data.

        Kept out of the ``state_dict`` so that the checkpoint also loads into a model with a plain
        ``PostProcessor``, which is what ``anomalib export --ckpt_path`` builds.
        """
        return {
            **super().checkpoint_config(),
            "pixel_prior": self.pixel_prior.to_config(),
            "model_input_size": list(self.model_input_size) if self.model_input_size else None,
        }

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_config` saved."""
        super().load_checkpoint_config(config)
        if config.get("pixel_prior"):
            self.pixel_prior.load_config(config["pixel_prior"])
        if config.get("model_input_size"):
            self.model_input_size = tuple(config["model_input_size"])

    # ---------------------------------------------------------------- settings
    def settings(self, tolerance: float) -> RefinementSettings:
        """The refinement's settings, with the given stopping tolerance."""
        return RefinementSettings(
            sparsity_weight=self.sparsity_weight,
            log_eps=self.log_eps,
            prior_weight=self.prior_weight,
            smoothness_weight=self.smoothness_weight,
            dilation=self.dilation,
            crop_margin=self.crop_margin,
            reach=self.reach,
            mask_threshold=self.mask_threshold,
            median_size=self.median_size,
            reestimate=self.reestimate,
            reestimation_iterations=self.reestimation_iterations,
            min_explained=self.min_explained,
            starts=tuple(self.starts),
            share_gradients=self.share_gradients,
            optimizer=OptimizerSettings(
                lr=self.lr,
                clip=self.clip,
                kernel_size=self.kernel_size,
                sigma_space=self.sigma_space,
                sigma_color=self.sigma_color,
                boost=self.step_boost,
                eps=self.log_eps,
                tolerance=tolerance,
                max_iterations=self.max_iterations,
            ),
        )

    # ---------------------------------------------------------------- training: prior and input size
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Fail at once if the model has no differentiable scorer."""
        del trainer, stage
        if self.enabled:
            scorer_class_for(pl_module.model)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,  # noqa: ANN401
        batch: Batch,
        batch_idx: int,
    ) -> None:
        """Record the model's input size and sample training pixels for the prior."""
        del trainer, outputs, batch_idx
        images = batch.image
        self.model_input_size = (int(images.shape[-2]), int(images.shape[-1]))
        pixels = _pixel_range(pl_module).to_unit(images.detach()).clamp(0, 1)
        wanted = self.calibration_images - sum(len(sample) for sample in self._calibration_samples)
        if self.calibration is None and wanted > 0:
            self._calibration_samples.append(pixels[:wanted].cpu())
        if self.pixel_prior.is_fitted or self._collected() >= self.prior_samples:
            return
        per_image = max(1, self.prior_samples // 50)
        flat = pixels.permute(0, 2, 3, 1).reshape(images.shape[0], -1, images.shape[1])
        picks = torch.randint(flat.shape[1], (images.shape[0], per_image), device=flat.device)
        sample = torch.gather(flat, 1, picks[..., None].expand(-1, -1, flat.shape[-1])).reshape(-1, flat.shape[-1])
        self._pixel_samples.append(sample[: self.prior_samples - self._collected()].cpu())

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fit the pixel prior on the sampled training pixels, then choose the weights (``calibration_images``)."""
        del trainer
        self._fit_prior_from_samples()
        if self.enabled:
            self._calibrate(pl_module)

    def _calibrate(self, pl_module: LightningModule) -> None:
        """Choose the sparsity, prior and TV weights on synthetic defects of the collected training images."""
        if not self._calibration_samples:
            return
        images = torch.cat(self._calibration_samples).to(pl_module.device)
        self._calibration_samples.clear()
        pixel_range = _pixel_range(pl_module)
        scorer = build_scorer(pl_module.model, pixel_range, self.num_candidates)
        settings = self.settings(scorer.tolerance if self.tolerance is None else self.tolerance)
        was_training = pl_module.model.training
        pl_module.model.eval()

        def anomaly_map(unit_images: torch.Tensor) -> torch.Tensor:
            maps = pl_module.model(pixel_range.from_unit(unit_images)).anomaly_map
            return F.interpolate(maps.reshape(maps.shape[0], 1, *maps.shape[-2:]), size=unit_images.shape[-2:])[:, 0]

        try:
            with torch.inference_mode(False), torch.enable_grad():
                prior = self.pixel_prior if self.pixel_prior.is_fitted else None
                result = calibrate(images, anomaly_map, scorer, self.inpainter, prior, settings)
        finally:
            pl_module.model.train(was_training)
        for name, value in result.weights.items():
            setattr(self, name, value)
        self.calibration = result.to_config()
        logger.info("F2PAD calibration on %d synthetic defects: %s", len(images), result.weights)

    def fit_pixel_prior(self, images: torch.Tensor) -> None:
        """Fit the pixel prior on all pixels of [0, 1] images ``(B, C, H, W)`` (for use outside an Engine)."""
        pixels = images.permute(0, 2, 3, 1).reshape(-1, images.shape[1])
        if pixels.shape[0] > self.prior_samples:
            pixels = pixels[torch.randperm(pixels.shape[0])[: self.prior_samples]]
        self.pixel_prior.fit(pixels)

    def _collected(self) -> int:
        return sum(sample.shape[0] for sample in self._pixel_samples)

    def _fit_prior_from_samples(self) -> None:
        if self._pixel_samples:
            self.pixel_prior.fit(torch.cat(self._pixel_samples))
            self._pixel_samples.clear()

    # ---------------------------------------------------------------- inference: refinement
    def _post_process_then_refine(
        self,
        hook: str,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Batch,
        *args: Any,  # noqa: ANN401
        **kwargs: Any,  # noqa: ANN401
    ) -> None:
        """Run ``PostProcessor``'s ``hook`` (normalise, threshold), then refine the masks."""
        raw_map = outputs.anomaly_map
        getattr(super(), hook)(trainer, pl_module, outputs, *args, **kwargs)
        if self.enabled:
            self.refine_batch(pl_module, outputs, raw_map)

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        """Post-process as usual, then refine the masks."""
        self._post_process_then_refine("on_test_batch_end", *args, **kwargs)

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        """Post-process as usual, then refine the masks."""
        self._post_process_then_refine("on_predict_batch_end", *args, **kwargs)

    def refine_batch(
        self, pl_module: LightningModule, batch: Batch, raw_anomaly_map: torch.Tensor | None
    ) -> Refinement:
        """Refine one post-processed batch in place; returns the full result."""
        self._fit_prior_from_samples()
        if not self.pixel_prior.is_fitted and self.prior_weight:
            self._warn_once("F2PAD: no training pixels seen, so the pixel prior is left out (see fit_pixel_prior).")
        pixel_range = _pixel_range(pl_module)
        scorer = build_scorer(pl_module.model, pixel_range, self.num_candidates)
        tolerance = scorer.tolerance if self.tolerance is None else self.tolerance
        with torch.inference_mode(False), torch.enable_grad():
            images = pixel_range.to_unit(batch.image.clone()).clamp(0, 1)
            initial = self._initial_masks(batch, raw_anomaly_map, images.shape[-2:]).clone()
            try:
                result = refine(
                    images,
                    initial,
                    scorer,
                    self.inpainter,
                    self.pixel_prior,
                    self.settings(tolerance),
                    working_size=self.model_input_size,
                )
            except NonFiniteError as error:
                raise ValueError(f"F2PAD: {error.what} of {_names(batch, error.items)} hold NaN or inf.") from error
        if self.calibration_veto and self.calibration is not None and not self.calibration["refines"]:
            result = result.fall_back(initial, initial.flatten(1).any(1))  # calibration: no refinement helped
        batch.initial_mask = initial
        batch.pred_mask = result.pred_mask
        batch.normal_image = result.normal_image
        batch.f2pad_fallback = result.fallback
        if self.replace_anomaly_map:
            refined_map = result.anomaly_map(self.mask_threshold)
            backbone_map = batch.anomaly_map
            if result.fallback.any() and backbone_map is not None and backbone_map.numel() == refined_map.numel():
                kept = result.fallback.reshape(-1, *([1] * (backbone_map.ndim - 1)))
                refined_map = torch.where(kept, backbone_map, refined_map.reshape(backbone_map.shape))
            batch.anomaly_map = refined_map
        if self.visualization_dir is not None:
            self._save_figures(batch, images, result)
        return result

    def _initial_masks(self, batch: Batch, raw_anomaly_map: torch.Tensor | None, size: torch.Size) -> torch.Tensor:
        """The backbone's masks at the image size, ``(B, H, W)`` bool."""
        if raw_anomaly_map is not None:
            try:
                check_finite("the anomaly maps", raw_anomaly_map)
            except NonFiniteError as error:
                raise ValueError(f"F2PAD: {error.what} of {_names(batch, error.items)} hold NaN or inf.") from error
        if self.initial_threshold is None and torch.isnan(self._pixel_threshold).item():
            self._warn_no_pixel_threshold(from_batch_mask=batch.pred_mask is not None)
        if self.initial_threshold is not None or batch.pred_mask is None:
            if raw_anomaly_map is None:
                msg = "F2PAD needs the model's anomaly_map to start from; this model gives none."
                raise ValueError(msg)
            threshold = self.initial_threshold if self.initial_threshold is not None else self.pixel_threshold
            if torch.isnan(torch.as_tensor(threshold)).item():
                msg = (
                    "F2PAD has no initial threshold: validate on images with masks first (F1-optimal threshold) "
                    "or pass initial_threshold=<raw anomaly-map value>."
                )
                raise ValueError(msg)
            masks = raw_anomaly_map > threshold
        else:
            masks = batch.pred_mask
        masks = masks.reshape(masks.shape[0], *masks.shape[-2:]).bool()
        if masks.shape[-2:] != size:
            masks = F.interpolate(masks[:, None].float(), size=tuple(size), mode="nearest")[:, 0] > 0
        return masks

    def _warn_no_pixel_threshold(self, from_batch_mask: bool) -> None:
        """Say once that validation set no pixel threshold, and which fallback gives the initial masks."""
        has_range = not (torch.isnan(self.pixel_min) | torch.isnan(self.pixel_max)).item()
        normalised = self.enable_normalization and has_range
        if from_batch_mask and not normalised:
            fallback = f"{float(self.normalized_pixel_threshold):g} on the un-normalised anomaly map"
        elif not torch.isnan(self.pixel_threshold).item():
            fallback = "the image-level threshold (anomalib's threshold matching)"
        elif from_batch_mask:
            fallback = "the midpoint of the anomaly-map range seen in validation"
        else:
            return  # no threshold at all: _initial_masks raises
        self._warn_once(
            f"F2PAD: validation set no pixel threshold (no validation masks?), so the initial masks use {fallback}. "
            "Validate on images with masks or pass initial_threshold=<raw anomaly-map value>.",
        )

    def _warn_once(self, message: str) -> None:
        """Log ``message`` the first time only (the hooks run once per batch)."""
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)

    def _save_figures(self, batch: Batch, images: torch.Tensor, result: Refinement) -> None:
        self.visualization_dir.mkdir(parents=True, exist_ok=True)
        paths = batch.image_path or [f"image_{index}" for index in range(images.shape[0])]
        gt_masks = batch.gt_mask if batch.gt_mask is not None else [None] * images.shape[0]
        for path, image, normal, mask, gt_mask in zip(
            paths, images, result.normal_image, result.pred_mask, gt_masks, strict=True
        ):
            name = "_".join(Path(path).with_suffix("").parts[-2:]) + ".png"
            refinement_figure(image, normal, mask, gt_mask).save(self.visualization_dir / name)


def _names(batch: Batch, items: list[int]) -> str:
    """The images at batch positions ``items``, by path where the batch has them."""
    paths = batch.image_path
    return ", ".join(str(paths[item]) if paths else f"batch image {item}" for item in items)


def _pixel_range(pl_module: LightningModule) -> PixelRange:
    """How the model's pre-processor normalises pixels (identity without one)."""
    pre_processor = getattr(pl_module, "pre_processor", None)
    return PixelRange.from_transform(getattr(pre_processor, "transform", None))
