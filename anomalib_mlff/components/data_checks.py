"""Checks on the data a model is fitted with, so that mistakes surface with a clear message.

Without them an empty training folder ends deep inside torch's sampler
("num_samples should be a positive integer value").
"""

from __future__ import annotations

from typing import Any


def describe_datamodule(datamodule: Any) -> str:  # noqa: ANN401 - any anomalib datamodule
    """Name a datamodule by class and, where it has them, root and category."""
    details = [f"{key}={getattr(datamodule, key)!s}" for key in ("root", "category") if hasattr(datamodule, key)]
    return f"{type(datamodule).__name__}({', '.join(details)})"


def require_training_images(datamodule: Any, minimum: int = 1) -> int:  # noqa: ANN401
    """Raise ``ValueError`` naming the dataset when it has fewer than ``minimum`` training images."""
    train_data = getattr(datamodule, "train_data", None)
    if train_data is None:
        return -1  # plain dataloaders: nothing to inspect before iterating
    count = len(train_data)
    if count < minimum:
        msg = (
            f"The training set of {describe_datamodule(datamodule)} has {count} image(s); at least {minimum} "
            "normal image(s) are needed. Check that the training folder (e.g. <root>/<category>/train/good) "
            "exists and holds image files."
        )
        raise ValueError(msg)
    return count
