"""MLFF: multi-level feature fusion network for anomaly detection (Tang et al., 2025).

The Lightning module owns the training loop: it turns each normal training batch into a
supervised one with pseudo anomalies (confetti noise, CutPaste), repeats every batch
``repeat`` times with fresh anomalies (the paper's 10x repeated training set), and optimises
the feature, score and consistency losses with SGD. The maths lives in :class:`MLFFModel`,
which is what ``anomalib export`` writes out.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_mlff import MLFF
    >>> from anomalib_mlff.data import embedded_datamodule
    >>> Engine(max_epochs=2).fit(MLFF(pre_trained=False), datamodule=embedded_datamodule())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_mlff.components.data_checks import require_training_images
from anomalib_mlff.components.normalization import PixelRange
from anomalib_mlff.components.pseudo_anomaly import PseudoAnomalyGenerator

from .loss import MLFFLoss
from .torch_model import MLFFModel

logger = logging.getLogger(__name__)

__all__ = ["MLFF"]


class MLFF(AnomalibModule):
    """Multi-level feature fusion network trained on pseudo anomalies.

    Args:
        backbone: timm CNN whose ``layers`` feed the network. Paper: ``"resnet50"``.
        layers: three backbone stages (shallow, middle, deep). Paper: layers 1-3.
        pre_trained: start from ImageNet weights (downloaded by timm).
        weights_path: local file with the backbone's ImageNet ``state_dict``, for offline sites.
        freeze_backbone: keep the backbone fixed (the paper trains it end to end).
        feature_dim: width of the fused per-pixel feature psi.
        use_stl, use_scconv, use_score_head: the paper's Table 4 ablation switches.
        tem_levels, ptfem_levels, ptfem_scales: STLNet quantisation settings.
        anomaly_ratio: share of training images that get a pseudo anomaly (paper: 0.5, Table 3).
        anomaly_methods: pseudo-anomaly generators used (``"confetti"``, ``"cutpaste"``).
        repeat: passes over each batch per epoch, each with fresh pseudo anomalies (paper: 10).
        feature_weight, score_weight, consistency_weight: loss weights alpha, beta, xi (paper: 1).
        gamma, margin: score-loss threshold and margin (paper: 2.5 and 5).
        learning_rate, momentum, weight_decay: SGD settings (paper: 1e-3, -, 3e-5).
        pre_processor, post_processor, evaluator, visualizer: anomalib components.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        weights_path: str | None = None,
        freeze_backbone: bool = False,
        feature_dim: int = 256,
        use_stl: bool = True,
        use_scconv: bool = True,
        use_score_head: bool = True,
        tem_levels: int = 128,
        ptfem_levels: int = 8,
        ptfem_scales: Sequence[int] = (1, 2, 4, 8),
        anomaly_ratio: float = 0.5,
        anomaly_methods: Sequence[str] = ("confetti", "cutpaste"),
        repeat: int = 10,
        feature_weight: float = 1.0,
        score_weight: float = 1.0,
        consistency_weight: float = 1.0,
        gamma: float = 2.5,
        margin: float = 5.0,
        learning_rate: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 3e-5,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        if repeat < 1:
            msg = f"repeat must be a positive integer, got repeat={repeat}."
            raise ValueError(msg)
        for name, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay), ("momentum", momentum)):
            if value < 0:
                msg = f"{name} must be >= 0, got {name}={value}."
                raise ValueError(msg)
        self.model = MLFFModel(
            backbone=backbone,
            layers=layers,
            pre_trained=pre_trained,
            weights_path=weights_path,
            freeze_backbone=freeze_backbone,
            feature_dim=feature_dim,
            use_stl=use_stl,
            use_scconv=use_scconv,
            use_score_head=use_score_head,
            tem_levels=tem_levels,
            ptfem_levels=ptfem_levels,
            ptfem_scales=ptfem_scales,
        )
        self.loss = MLFFLoss(
            feature_weight=feature_weight,
            score_weight=score_weight,
            consistency_weight=consistency_weight,
            gamma=gamma,
            margin=margin,
        )
        self.pseudo_anomalies = PseudoAnomalyGenerator(ratio=anomaly_ratio, methods=tuple(anomaly_methods))
        self.repeat = repeat
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.weight_decay = weight_decay
        # Each batch is optimised `repeat` times with fresh pseudo anomalies: manual optimisation.
        self.automatic_optimization = False

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD over the trainable parameters, as in the paper."""
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.SGD(
            parameters,
            lr=self.learning_rate,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )

    def on_fit_start(self) -> None:
        """Fail early, naming the dataset, when there is nothing to train on."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            require_training_images(datamodule)

    def _pixel_range(self) -> PixelRange:
        """How images in the batch map to [0, 1] (the pre-processor's normalisation, if any)."""
        transform = self.pre_processor.transform if isinstance(self.pre_processor, PreProcessor) else None
        return PixelRange.from_transform(transform)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Optimise ``repeat`` times on the batch, each time with fresh pseudo anomalies."""
        del args, kwargs
        optimizer = self.optimizers()
        pixel_range = self._pixel_range()
        clean = pixel_range.to_unit(batch.image)
        totals: dict[str, torch.Tensor] = {}
        for _ in range(self.repeat):
            images, masks = self.pseudo_anomalies(clean)
            output = self.model(pixel_range.from_unit(images))
            losses = self.loss(output.features, output.scores, masks)
            if not torch.isfinite(losses["loss"]):
                msg = (
                    f"MLFF training loss became {losses['loss'].item()} at step {self.global_step} "
                    f"({ {k: round(v.item(), 4) for k, v in losses.items()} }); "
                    f"lower learning_rate (now {self.learning_rate}) or check the input images for NaN/inf."
                )
                raise FloatingPointError(msg)
            optimizer.zero_grad()
            self.manual_backward(losses["loss"])
            optimizer.step()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.detach() / self.repeat
        self.log_dict(
            {f"train_{key}": value for key, value in totals.items()},
            prog_bar=True,
            on_epoch=True,
            batch_size=batch.image.shape[0],
        )
        return {"loss": totals["loss"]}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict on the validation batch; thresholds and normalisation are fitted from these."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation: thresholds come from full validation epochs."""
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """Trained on normal images only (pseudo anomalies are synthesised): one-class."""
        return LearningType.ONE_CLASS

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """anomalib's default: F1-adaptive thresholds and min-max score normalisation."""
        return PostProcessor()
