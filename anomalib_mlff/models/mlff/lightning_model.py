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
    >>> Engine().fit(MLFF(pre_trained=False, epochs=2), datamodule=embedded_datamodule())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_mlff.components.normalization import PixelRange
from anomalib_mlff.components.lightning import PseudoAnomalyMixin
from anomalib_mlff.components.pseudo_anomaly import PseudoAnomalyGenerator

from .loss import MLFFLoss
from .torch_model import MLFFModel

logger = logging.getLogger(__name__)

__all__ = ["MLFF"]


class MLFF(PseudoAnomalyMixin, AnomalibModule):
    """Multi-level feature fusion network trained on pseudo anomalies.

    Args:
        anomaly_ratio: share of training images that get a pseudo anomaly (paper: 0.5, Table 3).
        anomaly_methods: pseudo-anomaly generators used (``"confetti"``, ``"cutpaste"``).
        repeat: passes over each batch per epoch, each with fresh pseudo anomalies (paper: 10).
        feature_weight, score_weight, consistency_weight: loss weights alpha, beta, xi (paper: 1).
        gamma, margin: score-loss threshold and margin (paper: 2.5 and 5).
        learning_rate, momentum, weight_decay: SGD settings (paper: 1e-3, -, 3e-5).
        lr_decay: the learning rate is multiplied by this after every epoch (FCDD's MVTec schedule,
            0.985, which MLFF builds on; the paper gives only the "initial" rate); 1.0 keeps it constant.
        epochs: training epochs where the user sets none (paper: 200), e.g. in anomalib's benchmark
            pipeline or a plain ``Engine()``. A ``max_epochs`` the user gives (``Engine(max_epochs=N)``,
            ``--trainer.max_epochs N``) wins.
        pre_processor, post_processor, evaluator, visualizer: anomalib components.
        **model_args: :class:`MLFFModel`'s arguments, keyword only, with its defaults (the paper's):
            ``backbone`` (timm CNN, paper ``"resnet50"``), ``layers`` (layers 1-3), ``pre_trained``,
            ``weights_path`` (local ImageNet ``state_dict`` for offline sites), ``freeze_backbone``
            (the paper trains end to end), ``feature_dim`` (width of psi), ``use_stl``,
            ``use_scconv``, ``use_score_head`` (Table 4's ablation switches), ``tem_levels``,
            ``ptfem_levels``, ``ptfem_scales`` (STLNet quantisation). ``anomalib train --model MLFF
            --model.backbone resnet18`` sets them as any other.
    """

    def __init__(
        self,
        *,
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
        lr_decay: float = 0.985,
        epochs: int = 200,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        **model_args: Any,  # noqa: ANN401 - MLFFModel's arguments
    ) -> None:
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.init_sgd_training(MLFFModel, model_args, learning_rate, momentum, weight_decay)
        for name, value in (("repeat", repeat), ("epochs", epochs)):
            if value < 1:
                msg = f"{name} must be a positive integer, got {name}={value}."
                raise ValueError(msg)
        if not 0 < lr_decay <= 1:
            msg = f"lr_decay must be in (0, 1], got lr_decay={lr_decay}."
            raise ValueError(msg)
        self.lr_decay = lr_decay
        self.epochs = epochs
        self.model = MLFFModel(**model_args)
        self.loss = MLFFLoss(
            feature_weight=feature_weight,
            score_weight=score_weight,
            consistency_weight=consistency_weight,
            gamma=gamma,
            margin=margin,
        )
        self.pseudo_anomalies = PseudoAnomalyGenerator(ratio=anomaly_ratio, methods=tuple(anomaly_methods))
        self.repeat = repeat  # each batch is optimised `repeat` times with fresh pseudo anomalies

    def on_fit_start(self) -> None:
        """Check the data; refuse ``repeat > 1`` under DDP, where only a step's first backward is synchronised.

        DDP averages the gradients of the backward that follows its own forward; the further
        backward passes of a repeated batch would step each rank with its local gradients only and
        the replicas would drift apart silently.
        """
        super().on_fit_start()
        if self.repeat > 1 and self.trainer.world_size > 1:
            msg = (
                f"MLFF with repeat={self.repeat} cannot train on {self.trainer.world_size} DDP processes: DDP "
                "synchronises one backward pass per step. Set repeat=1 and multiply max_epochs by the repeat "
                "instead (the same number of steps and pseudo-anomaly draws), or train on one device."
            )
            raise ValueError(msg)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Optimise ``repeat`` times on the batch, each time with fresh pseudo anomalies."""
        del args, kwargs
        optimizer = self.optimizers()
        pixel_range = PixelRange.of_model(self)
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

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD with the learning rate decayed by ``lr_decay`` per epoch (stepped in :meth:`on_train_epoch_end`)."""
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_train_epoch_end(self) -> None:
        """Decay the learning rate (manual optimisation: Lightning leaves the scheduler to the model)."""
        self.lr_schedulers().step()

    @property
    def default_max_epochs(self) -> int:
        """``epochs``: the paper's 200 by default."""
        return self.epochs

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation (thresholds come from full validation epochs).

        The epochs are not among them: anomalib's Engine lets trainer arguments override the user's
        ``max_epochs``; :attr:`default_max_epochs` applies only where the user set none.
        """
        return {"num_sanity_val_steps": 0}
