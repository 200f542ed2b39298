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

import inspect
import logging
import typing
from dataclasses import fields, replace
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
from .optimizer import check_finite
from .prior import PixelPrior
from .refinement import Refinement, refine
from .sampling import TrainingSamples
from .scorers import DifferentiableScorer, build_scorer, scorer_class_for
from .settings import F2PADSettings, setting_names
from .visualization import refinement_figure

logger = logging.getLogger(__name__)


class F2PAD(PostProcessor):
    """Refines a feature-based model's masks to pixel accuracy (F2PAD, Cao et al.).

    Every field of :class:`F2PADSettings` is a keyword argument of the same name and default (the signature
    lists them, so anomalib's CLI and YAML see them); the constructor builds one frozen ``settings`` object from
    them, saved and restored whole with the checkpoint. Each setting also reads as an attribute
    (``f2pad.mask_threshold``), and assigning one replaces ``settings`` with a validated copy.

    Args:
        inpainter: ``"telea"``, ``"ns"``, ``"biharmonic"`` or an inpainter such as ``MAEInpainter``.
        visualization_dir: if set, save image / recovered image / mask side by side there per test image.
        enabled: refine at all (``False``: plain ``PostProcessor``).
        preset: a named set of settings (``"paper"``: F2PAD as published; ``settings.PRESETS``) the other
            arguments override. Since anomalib's CLI passes every argument, one equal to its project default
            counts as not given and the preset's value stands.
        **kwargs: the :class:`F2PADSettings` fields, then ``PostProcessor`` arguments (normalisation,
            thresholding, sensitivities).
    """

    def __init__(
        self,
        inpainter: str | Inpainter = "telea",
        visualization_dir: str | Path | None = None,
        enabled: bool = True,
        preset: str | None = None,
        **kwargs: Any,  # noqa: ANN401
    ) -> None:
        given = {name: kwargs.pop(name) for name in setting_names() if name in kwargs}
        settings = F2PADSettings.from_preset(preset, **given if preset is None else explicit_settings(given))
        super().__init__(**kwargs)
        self.settings = settings
        self.calibration: dict[str, Any] | None = None
        self.inpainter = build_inpainter(inpainter)
        self.visualization_dir = Path(visualization_dir) if visualization_dir is not None else None
        self.enabled = enabled
        self.pixel_prior = PixelPrior(n_components=settings.prior_components, reg_covar=settings.prior_reg_covar)
        self.model_input_size: tuple[int, int] | None = None
        self._training_samples = TrainingSamples()
        self._warned: set[str] = set()  # warnings given (each once per post-processor)
        self._checked_models: set[int] = set()  # models whose scores were checked to be differentiable

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401
        """A setting read as an attribute (``f2pad.mask_threshold``)."""
        settings = self.__dict__.get("settings")
        if settings is not None and name in _SETTING_NAMES:
            return getattr(settings, name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:  # noqa: ANN401
        """Assigning a setting replaces ``settings`` with a validated copy."""
        if name in _SETTING_NAMES and "settings" in self.__dict__:
            value, name = replace(self.settings, **{name: value}), "settings"
        super().__setattr__(name, value)

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        return (*super()._checkpoint_config_keys, "calibration", "enabled")

    def checkpoint_config(self) -> dict[str, Any]:
        """Settings (whole), the calibration, the fitted pixel prior and the model's input size, as plain data.

        Kept out of the ``state_dict`` so that the checkpoint also loads into a model with a plain
        ``PostProcessor``, which is what ``anomalib export --ckpt_path`` builds.
        """
        return {
            **super().checkpoint_config(),
            "settings": self.settings.to_config(),
            "pixel_prior": self.pixel_prior.to_config(),
            "model_input_size": list(self.model_input_size) if self.model_input_size else None,
        }

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_config` saved (checkpoints written before ``settings`` kept them flat)."""
        super().load_checkpoint_config(config)
        self.settings = F2PADSettings.from_config(config.get("settings", config))
        if config.get("pixel_prior"):
            self.pixel_prior.load_config(config["pixel_prior"])
        if config.get("model_input_size"):
            self.model_input_size = tuple(config["model_input_size"])

    # ---------------------------------------------------------------- training: prior and input size
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Fail at once, naming the model and the reason, if F2PAD cannot refine it.

        Before fitting only what needs no fitted model is checked (tiled, video, not an anomalib model); before
        testing or predicting, also that the model's scores have a gradient in the pixels (one forward and
        backward pass at the training image size).
        """
        del trainer
        if not self.enabled:
            return
        scorer_class_for(pl_module.model)
        if stage in {"test", "predict"} and self.model_input_size is not None:
            self._scorer(pl_module, self.model_input_size)

    def _scorer(self, pl_module: LightningModule, image_size: tuple[int, int]) -> DifferentiableScorer:
        """The model's scorer; the first time per model, checked to be differentiable on ``image_size`` images."""
        scorer = build_scorer(pl_module.model, PixelRange.of_model(pl_module), self.settings.num_candidates)
        if id(pl_module.model) not in self._checked_models:
            scorer.check_differentiable(tuple(image_size))
            self._checked_models.add(id(pl_module.model))
        return scorer

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
        self.model_input_size = (int(batch.image.shape[-2]), int(batch.image.shape[-1]))
        self._training_samples.add(
            PixelRange.of_model(pl_module).to_unit(batch.image.detach()).clamp(0, 1),
            pixel_budget=0 if self.pixel_prior.is_fitted else self.settings.prior_samples,
            image_budget=0 if self.calibration is not None else self.settings.calibration_images,
        )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fit the pixel prior on the sampled training pixels, then choose the weights (``calibration_images``)."""
        del trainer
        self._fit_prior_from_samples()
        if self.enabled:
            self._calibrate(pl_module)

    def _calibrate(self, pl_module: LightningModule) -> None:
        """Choose the sparsity, prior and TV weights on synthetic defects of the collected training images."""
        images = self._training_samples.take_images()
        if images is None:
            return
        images = images.to(pl_module.device)
        pixel_range = PixelRange.of_model(pl_module)
        scorer = self._scorer(pl_module, tuple(images.shape[-2:]))
        was_training = pl_module.model.training
        pl_module.model.eval()

        def anomaly_map(unit_images: torch.Tensor) -> torch.Tensor:
            maps = pl_module.model(pixel_range.from_unit(unit_images)).anomaly_map
            return F.interpolate(maps.reshape(maps.shape[0], 1, *maps.shape[-2:]), size=unit_images.shape[-2:])[:, 0]

        try:
            with torch.inference_mode(False), torch.enable_grad():
                prior = self.pixel_prior if self.pixel_prior.is_fitted else None
                result = calibrate(images, anomaly_map, scorer, self.inpainter, prior, self.settings)
        finally:
            pl_module.model.train(was_training)
        self.settings = replace(self.settings, **result.weights)
        self.calibration = result.to_config()
        logger.info("F2PAD calibration on %d synthetic defects: %s", len(images), result.weights)

    def fit_pixel_prior(self, images: torch.Tensor) -> None:
        """Fit the pixel prior on all pixels of [0, 1] images ``(B, C, H, W)`` (for use outside an Engine)."""
        pixels = images.permute(0, 2, 3, 1).reshape(-1, images.shape[1])
        if pixels.shape[0] > self.settings.prior_samples:
            pixels = pixels[torch.randperm(pixels.shape[0])[: self.settings.prior_samples]]
        self.pixel_prior.fit(pixels)

    def _fit_prior_from_samples(self) -> None:
        pixels = self._training_samples.take_pixels()
        if pixels is not None:
            self.pixel_prior.fit(pixels)

    # ---------------------------------------------------------------- inference: refinement
    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Batch, *args: Any  # noqa: ANN401
    ) -> None:
        """Post-process as usual (normalise, threshold), then refine the masks."""
        raw_map = outputs.anomaly_map
        super().on_test_batch_end(trainer, pl_module, outputs, *args)
        self._refine_if_enabled(pl_module, outputs, raw_map)

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Batch, *args: Any  # noqa: ANN401
    ) -> None:
        """Post-process as usual (normalise, threshold), then refine the masks."""
        raw_map = outputs.anomaly_map
        super().on_predict_batch_end(trainer, pl_module, outputs, *args)
        self._refine_if_enabled(pl_module, outputs, raw_map)

    def _refine_if_enabled(self, pl_module: LightningModule, batch: Batch, raw_map: torch.Tensor | None) -> None:
        if self.enabled:
            self.refine_batch(pl_module, batch, raw_map)

    def refine_batch(
        self, pl_module: LightningModule, batch: Batch, raw_anomaly_map: torch.Tensor | None
    ) -> Refinement:
        """Refine one post-processed batch in place; returns the full result."""
        self._fit_prior_from_samples()
        if not self.pixel_prior.is_fitted and self.settings.prior_weight:
            self._warn_once("F2PAD: no training pixels seen, so the pixel prior is left out (see fit_pixel_prior).")
        pixel_range = PixelRange.of_model(pl_module)
        scorer = self._scorer(pl_module, self.model_input_size or tuple(batch.image.shape[-2:]))
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
                    self.settings,
                    working_size=self.model_input_size,
                )
            except NonFiniteError as error:
                raise ValueError(f"F2PAD: {error.what} of {_names(batch, error.items)} hold NaN or inf.") from error
        if self.settings.calibration_veto and self.calibration is not None and not self.calibration["refines"]:
            result = result.fall_back(initial, initial.flatten(1).any(1))  # calibration: no refinement helped
        batch.initial_mask = initial
        batch.pred_mask = result.pred_mask
        batch.normal_image = result.normal_image
        batch.f2pad_fallback = result.fallback
        if self.settings.replace_anomaly_map:
            refined_map = result.anomaly_map(self.settings.mask_threshold)
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
        if self.settings.initial_threshold is None and torch.isnan(self._pixel_threshold).item():
            self._warn_no_pixel_threshold(from_batch_mask=batch.pred_mask is not None)
        if self.settings.initial_threshold is not None or batch.pred_mask is None:
            if raw_anomaly_map is None:
                msg = "F2PAD needs the model's anomaly_map to start from; this model gives none."
                raise ValueError(msg)
            threshold = self.settings.initial_threshold
            if threshold is None:
                threshold = self.pixel_threshold
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


_SETTING_NAMES = frozenset(setting_names())


def explicit_settings(given: dict[str, Any]) -> dict[str, Any]:
    """The settings in ``given`` that differ from their project default (the CLI passes every default)."""
    defaults, built = F2PADSettings(), F2PADSettings(**given)  # built: YAML's lists read as the tuples they become
    return {name: value for name, value in given.items() if getattr(built, name) != getattr(defaults, name)}


def _flat_signature() -> inspect.Signature:
    """F2PAD's own arguments, then every setting with its default and type, then ``**kwargs`` for PostProcessor."""
    own = inspect.signature(F2PAD.__init__)
    types = typing.get_type_hints(F2PADSettings)
    keyword = inspect.Parameter.KEYWORD_ONLY
    settings = [
        inspect.Parameter(field.name, keyword, default=field.default, annotation=types[field.name])
        for field in fields(F2PADSettings)
    ]
    parameters = list(own.parameters.values())
    return own.replace(parameters=[*parameters[:-1], *settings, parameters[-1]])


F2PAD.__init__.__signature__ = _flat_signature()  # type: ignore[attr-defined]
