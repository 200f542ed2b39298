"""Lightning plumbing shared by the models trained with SGD on synthesised pseudo anomalies (MLFF, MFFA).

:class:`PseudoAnomalyMixin` goes before ``AnomalibModule`` in a model's bases
(``class MLFF(PseudoAnomalyMixin, AnomalibModule)``), so the model stays a direct subclass of
``AnomalibModule`` (anomalib's ``get_model("mlff")`` looks only at those). It has no
``__init__``; the model's ``__init__`` calls :meth:`~PseudoAnomalyMixin.init_sgd_training`, then
builds its torch model from ``**model_args`` itself. It

- checks and stores the SGD settings, optimises the trainable parameters with SGD, and switches
  to manual optimisation (the models step more or less than once per batch);
- trains for the model's :attr:`~PseudoAnomalyMixin.default_max_epochs` (the paper's schedule)
  only where the user set no length: a ``max_epochs`` given to anomalib's ``Engine``, to a
  Lightning ``Trainer`` or as ``--trainer.max_epochs`` wins;
- records every argument of the torch model, defaults included, in the hyperparameters (the
  Lightning module takes them as ``**model_args`` and calls the torch model class with them, so
  the torch model's signature is the one place they are written; jsonargparse, i.e.
  ``anomalib train --model.<arg>``, reads them from that call);
- maps batches between the pre-processor's normalised space and [0, 1] pixels (pseudo anomalies
  are drawn on [0, 1] images);
- checks every image file before training (:func:`check_before_fit`) and fails early, naming
  the dataset, when there are no training images;
- loads checkpoints without downloading or reading the initial weights the checkpoint replaces;
- predicts in validation (thresholds and normalisation are fitted from those predictions), is
  one-class and uses anomalib's default post-processor.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.post_processing import PostProcessor
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_mlff.components.data_checks import check_before_fit

logger = logging.getLogger(__name__)

__all__ = ["PseudoAnomalyMixin"]


class PseudoAnomalyMixin:
    """Methods of a one-class ``AnomalibModule`` trained by SGD on pseudo anomalies; ``self.model``: the torch model."""

    #: Model arguments that only say where the initial weights come from (download or local file).
    initial_weight_args: tuple[str, ...] = ("pre_trained", "weights_path")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        """Lightning's loader, without fetching initial weights: the checkpoint replaces every one of them.

        The checkpoint records ``pre_trained=True`` and the weight files of the machine it was trained
        on; rebuilding with them would download ImageNet weights (or read files that are not there)
        only to overwrite them, which fails at offline sites (``anomalib export --ckpt_path`` loads
        this way). Explicit keyword arguments still win.
        """
        for name in cls.initial_weight_args:
            kwargs.setdefault(name, False if name == "pre_trained" else None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def init_sgd_training(
        self,
        model_class: type[nn.Module],
        model_args: dict[str, Any],
        learning_rate: float,
        momentum: float,
        weight_decay: float,
    ) -> None:
        """The constructor block of the SGD-trained models: SGD settings, the model arguments, manual optimisation.

        Checks and stores the SGD settings, records every argument of ``model_class(**model_args)`` in
        the hyperparameters and switches Lightning to manual optimisation. The caller then builds
        ``self.model = model_class(**model_args)`` in its own ``__init__``, where jsonargparse sees
        which class takes ``**model_args`` (``anomalib train --model.<arg>``).
        """
        self.set_sgd(learning_rate, momentum, weight_decay)
        self.record_model_args(model_class, model_args)
        self.automatic_optimization = False

    def set_sgd(self, learning_rate: float, momentum: float, weight_decay: float) -> None:
        """Check (each >= 0) and store the SGD settings."""
        for name, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay), ("momentum", momentum)):
            if value < 0:
                msg = f"{name} must be >= 0, got {name}={value}."
                raise ValueError(msg)
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.weight_decay = weight_decay

    def record_model_args(self, model_class: type[nn.Module], model_args: dict[str, Any]) -> None:
        """Put every argument of ``model_class(**model_args)``, defaults included, into ``self.hparams``.

        An argument ``model_class`` does not take is a ``TypeError`` naming both classes.
        """
        try:
            bound = inspect.signature(model_class).bind(**model_args)
        except TypeError as error:
            name = type(self).__name__
            msg = f"{name}: {error} (not an argument of {name} or {model_class.__name__})."
            raise TypeError(msg) from error
        bound.apply_defaults()
        self.hparams.update(bound.arguments)

    # ------------------------------------------------------------------ epochs
    @property
    def default_max_epochs(self) -> int:
        """Lightning epochs of the model's own schedule, used where the user set no training length."""
        raise NotImplementedError

    @property
    def trainer(self) -> Trainer:
        """Lightning's ``trainer``; attaching one to fit settles the number of epochs (:meth:`settle_max_epochs`)."""
        return super().trainer  # type: ignore[misc]

    @trainer.setter
    def trainer(self, trainer: Trainer | None) -> None:
        LightningModule.trainer.fset(self, trainer)  # type: ignore[attr-defined]
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            self.settle_max_epochs(trainer)

    def settle_max_epochs(self, trainer: Trainer) -> None:
        """Give ``trainer`` the model's :attr:`default_max_epochs` where Lightning would fall back to 1,000.

        Lightning attaches the model before it resolves the loop limits, so ``max_epochs`` is still
        ``None`` here exactly when nobody set it. As in Lightning, a ``max_steps`` or ``max_time``
        also counts as a length the user set. The model's default is not a trainer argument
        because anomalib's ``Engine`` lets those override the user's.
        """
        loop = trainer.fit_loop
        timed = any(isinstance(callback, Timer) for callback in trainer.callbacks)
        if loop.max_epochs is None and trainer.max_steps == -1 and not timed:
            loop.max_epochs = self.default_max_epochs
            logger.info("%s: max_epochs not set; training the model's %d epochs.", type(self).__name__, loop.max_epochs)

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        """SGD over the trainable parameters."""
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.SGD(
            parameters, lr=self.learning_rate, momentum=self.momentum, weight_decay=self.weight_decay
        )

    #: Leave unreadable, truncated, empty or 16-bit images out with a warning instead of stopping.
    skip_bad_images: bool = False

    def count_training_images(self) -> int:
        """Check the datamodule's image files, then count its training images (-1: unknown).

        ``ValueError`` listing every bad file (unless ``skip_bad_images``), or naming the dataset when
        it has no training image.
        """
        return check_before_fit(getattr(self.trainer, "datamodule", None), self.skip_bad_images)

    def on_fit_start(self) -> None:
        """Fail early, naming the dataset, when there is nothing to train on."""
        self.count_training_images()

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict on the validation batch; thresholds and normalisation are fitted from these."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    @property
    def learning_type(self) -> LearningType:
        """Trained on normal images only (pseudo anomalies are synthesised): one-class."""
        return LearningType.ONE_CLASS

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """anomalib's default: F1-adaptive thresholds and min-max score normalisation."""
        return PostProcessor()
