"""MFFA: multi-level feature fusion with CaiT-guided self-attention and anomaly map compensation.

Training has two phases, both ordinary Lightning epochs, so the progress bar shows each:

1. PSG (every epoch but the last, only with ``use_psg``): every normal batch becomes a 3-way
   normal / CutPaste / CutPaste-Scar classification batch; SGD fine-tunes the backbone over
   the cross-entropy (manual optimisation: one zero_grad/backward/step per batch, as Lightning's
   automatic loop would do, so that the fill epoch can skip optimising under DDP).
2. Fill (the last epoch): the backbone in eval mode embeds the training images, batch by batch
   into bounded-memory fit state (a streaming coreset, Gaussian running sums); at the end of
   that epoch (before validation) the memory bank is filled and the Gaussians are fitted, from
   the state of all ranks under DDP.

Where the user sets no ``max_epochs`` the model trains ``psg_epochs + 1`` epochs (the paper's 64
PSG epochs by default); a ``max_epochs`` the user sets wins and gives ``max_epochs - 1`` PSG
epochs. Without PSG the model asks anomalib's Engine for one epoch, like PaDiM. Validation runs
only after the last epoch. The maths lives in :class:`MFFAModel`, which is what ``anomalib export``
writes out.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_mlff import MFFA
    >>> from anomalib_mlff.data import embedded_datamodule
    >>> model = MFFA(backbone="resnet18", cait_backbone="cait_xxs24_224", n_gaussian_features=100, pre_trained=False)
    >>> Engine().fit(model, datamodule=embedded_datamodule())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_mlff.components.normalization import PixelRange
from anomalib_mlff.components.data_checks import describe_datamodule, first_training_image
from anomalib_mlff.components.lightning import PseudoAnomalyMixin

from .gaussian import MIN_GAUSSIAN_IMAGES
from .loss import PSGLoss
from .psg import pseudo_sample_batch
from .torch_model import MFFAModel

logger = logging.getLogger(__name__)

__all__ = ["MFFA"]


class MFFA(PseudoAnomalyMixin, AnomalibModule):
    """MFFA: PSG fine-tuning, LGFFP (CaiT) features, NNS x Gaussian anomaly maps.

    Args:
        psg_epochs: PSG fine-tuning epochs where the user sets no ``max_epochs`` (paper: 64); the fill
            pass is one more epoch. A ``max_epochs`` the user sets (``Engine(max_epochs=N)``,
            ``--trainer.max_epochs N``) wins: ``N - 1`` PSG epochs, then the fill epoch.
        learning_rate, momentum, weight_decay: PSG's SGD (paper: 3e-4, 0.9, 3e-5).
        skip_bad_images: leave unreadable, truncated, empty or 16-bit image files out (with a
            warning) instead of stopping before training with their list.
        pre_processor, post_processor, evaluator, visualizer: anomalib components.
        **model_args: :class:`MFFAModel`'s arguments, keyword only, with its defaults (the paper's):
            ``backbone``, ``layers``, ``pre_trained``, ``weights_path`` (the CNN: ImageNet
            WideResNet-50 layers 1-3); ``cait_backbone``, ``cait_blocks``, ``cait_weights_path``
            (LGFFP's CaiT: 768 wide, 11 blocks); ``use_nns``, ``use_gaussian``, ``use_lgffp``,
            ``use_psg`` (the ablation switches of Tables 1 and 2); ``coreset_ratio`` (0.01),
            ``n_gaussian_features`` (570), ``grid_layer``, ``blur_sigma`` (4),
            ``approximate_search``; ``seed`` (random selections, coreset, and here PSG's pseudo
            anomalies). ``anomalib train --model MFFA --model.backbone resnet18`` sets them as any other.

    The paper's batch size (32) is the datamodule's ``train_batch_size``.
    """

    initial_weight_args = ("pre_trained", "weights_path", "cait_weights_path")

    def __init__(
        self,
        *,
        psg_epochs: int = 64,
        learning_rate: float = 3e-4,
        momentum: float = 0.9,
        weight_decay: float = 3e-5,
        skip_bad_images: bool = False,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        **model_args: Any,  # noqa: ANN401 - MFFAModel's arguments
    ) -> None:
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.init_sgd_training(MFFAModel, model_args, learning_rate, momentum, weight_decay)
        self.skip_bad_images = skip_bad_images
        self.model = MFFAModel(**model_args)
        self.use_psg = self.model.psg_head is not None
        if self.use_psg and (not isinstance(psg_epochs, int) or psg_epochs < 1):
            msg = f"psg_epochs must be a positive integer with use_psg=True, got psg_epochs={psg_epochs!r}."
            raise ValueError(msg)
        self.loss = PSGLoss()
        self.psg_epochs = psg_epochs if self.use_psg else 0
        self.seed = self.model.seed
        self._pseudo_generator = torch.Generator().manual_seed(self.seed)
        self._filled_images = 0  # training images this rank accumulated in the fill epoch
        self._fill_pending = False  # a fill epoch started and its state is not fitted yet (same on every rank)

    # ------------------------------------------------------------------ set-up
    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        """PSG's SGD over the backbone and the classifier; nothing to optimise without PSG."""
        return super().configure_optimizers() if self.use_psg else None

    @property
    def default_max_epochs(self) -> int:
        """``psg_epochs`` + the fill epoch."""
        return self.psg_epochs + 1

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation; without PSG one epoch (the fill pass), like PaDiM.

        With PSG the epochs are not among them: anomalib's Engine lets trainer arguments override the
        user's ``max_epochs``; :attr:`default_max_epochs` applies only where the user set none. Any
        number of devices: under DDP the memory bank and the Gaussians are combined across ranks.
        """
        return {"num_sanity_val_steps": 0} if self.use_psg else {"max_epochs": 1, "num_sanity_val_steps": 0}

    def settle_max_epochs(self, trainer: Trainer) -> None:
        """The user's or the default epochs; validate only after the last one (the fill epoch).

        ``ValueError`` when the trainer has no finite epoch count (a ``max_steps`` or ``max_time`` alone)
        or, without PSG, more than the one fill pass.
        """
        super().settle_max_epochs(trainer)
        epochs = trainer.fit_loop.max_epochs
        if epochs is None or epochs < 1 or (not self.use_psg and epochs != 1):
            expected = "max_epochs=1 (use_psg=False: one pass)" if not self.use_psg else "max_epochs >= 1"
            msg = (
                f"MFFA fills its memory bank and Gaussians in the last training epoch and needs {expected}, got "
                f"max_epochs={epochs}. Leave max_epochs, max_steps and max_time unset for psg_epochs + 1 epochs."
            )
            raise ValueError(msg)
        if self.use_psg and epochs == 1:
            logger.warning("MFFA: max_epochs=1 leaves no PSG epoch; the backbone is not fine-tuned.")
        trainer.check_val_every_n_epoch = epochs

    # ------------------------------------------------------------------ training
    def _in_fill_epoch(self) -> bool:
        return self.current_epoch >= self.trainer.max_epochs - 1

    def on_fit_start(self) -> None:
        """Fail early, naming the dataset, when there are too few training images or ``memory_budget_mb`` cannot hold
        the NNS coreset (before any image is embedded); reset the PSG draws."""
        count = self.count_training_images()
        if self.model.gaussian is not None and 0 <= count < MIN_GAUSSIAN_IMAGES:
            msg = (
                f"The training set of {describe_datamodule(self.trainer.datamodule)} has {count} image; MFFA's "
                f"Gaussian branch needs at least {MIN_GAUSSIAN_IMAGES} to estimate a covariance. Add images or set "
                "use_gaussian=False."
            )
            raise ValueError(msg)
        image = first_training_image(self.trainer.datamodule, self.pre_processor) if count > 0 else None
        if image is not None and self.model.nns is not None:  # a budget too small for the coreset stops here
            self.model.nns.check_budget(self.model, count, image.to(self.device), self.trainer.world_size)
        self._pseudo_generator.manual_seed(self.seed)

    def on_train_epoch_start(self) -> None:
        """Announce the phase this epoch belongs to."""
        if self._in_fill_epoch():
            self._filled_images = 0
            self._fill_pending = True
            logger.info("MFFA: embedding the training images to fill the memory bank and fit the Gaussians.")
        elif self.current_epoch == 0:
            logger.info("MFFA: PSG fine-tuning for %d epochs, then one pass to fit the branches.",
                        self.trainer.max_epochs - 1)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """A PSG classification step, or (fill epoch) collect the batch's branch embeddings."""
        del args, kwargs
        if self._in_fill_epoch():
            self.model.eval()  # BatchNorm statistics as at inference
            with torch.no_grad():
                embeddings = self.model.embed(batch.image)
            self.model.accumulate(embeddings)
            self._filled_images += len(batch.image)
            self.log(
                "fill_images",
                float(self._filled_images),
                prog_bar=True,
                on_step=True,
                on_epoch=False,
                batch_size=len(batch.image),
            )
            return None
        pixel_range = PixelRange.of_model(self)
        images, labels = pseudo_sample_batch(pixel_range.to_unit(batch.image).clamp(0, 1), self._pseudo_generator)
        logits = self.model(pixel_range.from_unit(images))
        losses = self.loss(logits, labels)
        if not torch.isfinite(losses["loss"]):
            msg = (
                f"MFFA's PSG loss became {losses['loss'].item()} at step {self.global_step}; lower learning_rate "
                f"(now {self.learning_rate}) or check the input images for NaN/inf."
            )
            raise FloatingPointError(msg)
        self.log_dict(
            {"train_loss": losses["loss"], "train_accuracy": losses["accuracy"]},
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=len(labels),
        )
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(losses["loss"])
        optimizer.step()
        return losses["loss"].detach()

    def _fit_collected(self) -> None:
        """Fit the branches from the fill epoch's accumulated state (once; every DDP rank takes part)."""
        if not self._fill_pending:
            return
        logger.info("MFFA: fitting the memory bank and the Gaussians (%d training images on this rank).",
                    self._filled_images)
        self._fill_pending = False
        self.model.finish_fit()

    def on_train_epoch_end(self) -> None:
        """After the fill epoch (when there is no validation first): fit the branches."""
        self._fit_collected()

    # ------------------------------------------------------------------ evaluation
    def _require_fitted(self) -> None:
        self._fit_collected()
        if not self.model.is_fitted:
            msg = (
                "MFFA is not fitted: the memory bank and the Gaussians are filled in the last training epoch, "
                "after the PSG epochs. Fit it (to the end of its epochs) or load a fitted checkpoint."
            )
            raise RuntimeError(msg)

    def on_validation_start(self) -> None:
        """Validation follows the fill epoch directly: fit the branches first."""
        self._require_fitted()

    def on_test_start(self) -> None:
        """Testing needs fitted branches."""
        self._require_fitted()

    def on_predict_start(self) -> None:
        """Prediction needs fitted branches."""
        self._require_fitted()
