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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.post_processing import PostProcessor
from lightning import LightningModule, Trainer

from anomalib_mlff.components.normalization import PixelRange

from .adaptation import ModelScorers
from .arguments import settings_as_arguments
from .batch import naming_images, write_results
from .calibration import calibrate_model
from .initial_mask import WarnOnce, initial_masks
from .inpaint import Inpainter, build_inpainter
from .prior import PixelPrior
from .refinement import Refinement, refine
from .sampling import TrainingSamples
from .scorers import scorer_class_for
from .settings import F2PADSettings, setting_names
from .visualization import save_figures

logger = logging.getLogger(__name__)


@settings_as_arguments(F2PADSettings)
class F2PAD(PostProcessor):
    """Refines a feature-based model's masks to pixel accuracy (F2PAD, Cao et al.).

    Every field of :class:`F2PADSettings` is also a keyword argument of the same name and default (anomalib's CLI
    and YAML see them) and an attribute (``f2pad.mask_threshold``; assigning one replaces ``settings`` with a
    validated copy). The settings are saved and restored whole with the checkpoint.

    Args:
        settings: the settings to start from (default: :class:`F2PADSettings`'s defaults); keyword arguments
            named after its fields override them.
        inpainter: ``"telea"``, ``"ns"``, ``"biharmonic"`` or an inpainter such as ``MAEInpainter``.
        visualization_dir: if set, save image / recovered image / mask side by side there per test image.
        enabled: refine at all (``False``: plain ``PostProcessor``).
        preset: a named set of settings (``"paper"``: F2PAD as published; ``settings.PRESETS``) that ``settings``
            and the other arguments override. Since anomalib's CLI passes every argument, one equal to its project
            default counts as not given and the preset's value stands.
        **kwargs: setting overrides, then ``PostProcessor`` arguments (normalisation, thresholding, sensitivities).
    """

    def __init__(
        self,
        settings: F2PADSettings | None = None,
        inpainter: str | Inpainter = "telea",
        visualization_dir: str | Path | None = None,
        enabled: bool = True,
        preset: str | None = None,
        **kwargs: Any,  # noqa: ANN401
    ) -> None:
        overrides = {name: kwargs.pop(name) for name in setting_names() if name in kwargs}
        if preset is not None:
            overrides = explicit_settings(overrides)
        super().__init__(**kwargs)
        self.settings = replace(settings or F2PADSettings.from_preset(preset), **overrides)
        self.calibration: dict[str, Any] | None = None
        self.inpainter = build_inpainter(inpainter)
        self.visualization_dir = Path(visualization_dir) if visualization_dir is not None else None
        self.enabled = enabled
        self.pixel_prior = PixelPrior(self.settings.prior_components, self.settings.prior_reg_covar)
        self.model_input_size: tuple[int, int] | None = None
        self._training_samples = TrainingSamples()
        self._scorers = ModelScorers()
        self._warn_once = WarnOnce()

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
        """Restore what :meth:`checkpoint_config` saved (a checkpoint may also hold the settings as flat keys)."""
        super().load_checkpoint_config(config)
        self.settings = F2PADSettings.from_config(config.get("settings", config))
        if config.get("pixel_prior"):
            self.pixel_prior.load_config(config["pixel_prior"])
        if config.get("model_input_size"):
            self.model_input_size = tuple(config["model_input_size"])

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
            self._scorers(pl_module, self.settings.num_candidates, self.model_input_size)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Batch, batch_idx: int  # noqa: ANN401
    ) -> None:
        """Record the model's input size and sample training pixels for the prior and images for the calibration."""
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
        images = self._training_samples.take_images() if self.enabled else None
        if images is None:
            return
        scorer = self._scorers(pl_module, self.settings.num_candidates, tuple(images.shape[-2:]))
        prior = self.pixel_prior if self.pixel_prior.is_fitted else None
        result = calibrate_model(pl_module, images, scorer, self.inpainter, prior, self.settings)
        self.settings = replace(self.settings, **result.weights)
        self.calibration = result.to_config()
        logger.info("F2PAD calibration on %d synthetic defects: %s", len(images), result.weights)

    def fit_pixel_prior(self, images: torch.Tensor) -> None:
        """Fit the pixel prior on the pixels of [0, 1] images ``(B, C, H, W)`` (for use outside an Engine)."""
        self.pixel_prior.fit_images(images, self.settings.prior_samples)

    def _fit_prior_from_samples(self) -> None:
        pixels = self._training_samples.take_pixels()
        if pixels is not None:
            self.pixel_prior.fit(pixels)

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Batch, *args: Any  # noqa: ANN401
    ) -> None:
        """Post-process as usual (normalise, threshold), then refine the masks."""
        raw_map = outputs.anomaly_map
        super().on_test_batch_end(trainer, pl_module, outputs, *args)
        if self.enabled:
            self.refine_batch(pl_module, outputs, raw_map)

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Batch, *args: Any  # noqa: ANN401
    ) -> None:
        """Post-process as usual (normalise, threshold), then refine the masks."""
        raw_map = outputs.anomaly_map
        super().on_predict_batch_end(trainer, pl_module, outputs, *args)
        if self.enabled:
            self.refine_batch(pl_module, outputs, raw_map)

    def refine_batch(
        self, pl_module: LightningModule, batch: Batch, raw_anomaly_map: torch.Tensor | None
    ) -> Refinement:
        """Refine one post-processed batch in place (see :func:`write_results`); returns the full result."""
        self._fit_prior_from_samples()
        if not self.pixel_prior.is_fitted and self.settings.prior_weight:
            self._warn_once("F2PAD: no training pixels seen, so the pixel prior is left out (see fit_pixel_prior).")
        image_size = self.model_input_size or tuple(batch.image.shape[-2:])
        scorer = self._scorers(pl_module, self.settings.num_candidates, image_size)
        with torch.inference_mode(False), torch.enable_grad():
            images = PixelRange.of_model(pl_module).to_unit(batch.image.clone()).clamp(0, 1)
            initial = self._initial_masks(batch, raw_anomaly_map, images.shape[-2:]).clone()
            with naming_images(batch):
                result = refine(images, initial, scorer, self.inpainter, self.pixel_prior, self.settings,
                                working_size=self.model_input_size)
        veto = self.settings.calibration_veto and self.calibration is not None and not self.calibration["refines"]
        result = write_results(batch, initial, result, self.settings, keep_backbone=veto)
        if self.visualization_dir is not None:
            save_figures(self.visualization_dir, batch, images, result)
        return result

    def _initial_masks(self, batch: Batch, raw_anomaly_map: torch.Tensor | None, size: torch.Size) -> torch.Tensor:
        """The backbone's masks at the image size, ``(B, H, W)`` bool (see :func:`initial_masks`)."""
        threshold = self.settings.initial_threshold
        return initial_masks(self, threshold, batch, raw_anomaly_map, size, self._warn_once)


def explicit_settings(given: dict[str, Any]) -> dict[str, Any]:
    """The settings in ``given`` that differ from their project default (the CLI passes every default)."""
    defaults, built = F2PADSettings(), F2PADSettings(**given)  # built: YAML's lists read as the tuples they become
    return {name: value for name, value in given.items() if getattr(built, name) != getattr(defaults, name)}
