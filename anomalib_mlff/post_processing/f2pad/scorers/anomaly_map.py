"""Any anomalib image model, through its own forward pass: its raw anomaly map as the score."""

from __future__ import annotations

import torch
from torch.nn import functional as F  # noqa: N812

from ..window import FeatureWindow
from .base import DifferentiableScorer, MissingScorerError, PositionScores


class AnomalyMapScorer(DifferentiableScorer):
    """Any anomalib image model: its raw anomaly map (before anomalib's normalisation), through its own forward.

    The "embedding" is the map itself, resized to the image if the model gives it smaller, and each
    pixel's score is its value. Scored on whole images, since a model may use image-wide quantities.
    :meth:`check_differentiable` refuses a model whose map gives the pixels no gradient.
    """

    crop_allowed = False

    def _strides(self) -> tuple[int, int]:
        return 1, 1  # one score per pixel

    def _embed(self, normalised: torch.Tensor) -> torch.Tensor:
        anomaly_map = self._anomaly_map(normalised)
        anomaly_map = anomaly_map.reshape(anomaly_map.shape[0], 1, *anomaly_map.shape[-2:])
        if anomaly_map.shape[-2:] != normalised.shape[-2:]:
            anomaly_map = F.interpolate(anomaly_map, size=normalised.shape[-2:], mode="bilinear")
        return anomaly_map

    def _anomaly_map(self, normalised: torch.Tensor) -> torch.Tensor:
        output = self.model(normalised)
        anomaly_map = getattr(output, "anomaly_map", None)
        if anomaly_map is None:
            msg = (
                f"F2PAD cannot refine {type(self.model).__name__}: its forward pass gives no anomaly map "
                "(image-level scores only)."
            )
            raise MissingScorerError(msg)
        return anomaly_map

    def prepare(
        self, initial_embedding: torch.Tensor, window: FeatureWindow, positions: torch.Tensor | None = None
    ) -> PositionScores:
        """Nothing to fix at the initial estimate: the score is the map's value."""
        del initial_embedding, window, positions

        def scores(embedding: torch.Tensor) -> torch.Tensor:
            return embedding[:, 0]

        return scores

    def check_differentiable(self, image_size: tuple[int, int]) -> None:
        """Run the model once on a ``image_size`` image and check that its map's gradient reaches the pixels."""
        name = type(self.model).__name__
        generator = torch.Generator().manual_seed(0)
        parameter = next(self.model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        probe = torch.rand(1, 3, *image_size, generator=generator).to(device).requires_grad_(True)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                try:
                    anomaly_map = self.embed(probe)
                except MissingScorerError:
                    raise
                except Exception as error:
                    msg = f"F2PAD cannot refine {name}: its forward pass failed ({type(error).__name__}: {error})."
                    raise MissingScorerError(msg) from error
                if not anomaly_map.requires_grad:
                    msg = (
                        f"F2PAD cannot refine {name}: no gradient reaches the pixels from its anomaly map (its forward "
                        "pass runs under torch.no_grad or detaches the map)."
                    )
                    raise MissingScorerError(msg)
                (gradient,) = torch.autograd.grad(anomaly_map.sum(), probe, allow_unused=True)
        finally:
            self.model.train(was_training)
        if gradient is None or not bool(torch.isfinite(gradient).all()) or not bool(gradient.abs().sum() > 0):
            msg = f"F2PAD cannot refine {name}: the gradient of its anomaly map to the pixels is zero or not finite."
            raise MissingScorerError(msg)
