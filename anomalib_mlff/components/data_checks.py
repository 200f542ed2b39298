"""Checks on the data a model is fitted with, so that mistakes surface with a clear message.

Without them an empty training folder ends deep inside torch's sampler
("num_samples should be a positive integer value"), a truncated PNG stops a long fit with PIL's
"image file is truncated" naming no file, and a 16-bit image is silently read as white.
:func:`check_image_files` finds all of those, by path, before training starts.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: Threads decoding images in the pre-flight check.
PREFLIGHT_WORKERS = min(8, os.cpu_count() or 1)


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


# --------------------------------------------------------------------------- image pre-flight
#: PIL modes anomalib's ``read_image`` (``convert("RGB")``) clips to 8 bits: a 16-bit image turns (nearly) white.
CLIPPED_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def image_problem(path: str | Path) -> str | None:
    """Why anomalib cannot read the image at ``path`` faithfully (missing, empty, unreadable, truncated,
    more than 8 bits per channel), or ``None`` when it can."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "empty file"
    try:
        with Image.open(path) as image:
            mode = image.mode
            image.load()  # decodes every byte: a truncated file fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"unreadable ({error})"
    if mode in CLIPPED_MODES:
        return f"{mode} (16/32-bit) image: anomalib's loader clips it to 8 bits, reading it as nearly white"
    return None


def check_image_files(
    datamodule: Any,  # noqa: ANN401 - any anomalib datamodule
    skip_bad: bool = False,
    workers: int = PREFLIGHT_WORKERS,
    progress: bool = True,
) -> dict[str, str]:
    """Check every image of the datamodule's set-up datasets before a long fit; return ``{path: problem}``.

    The files are opened and fully decoded in ``workers`` threads (PIL releases the GIL while
    decoding). Problems raise one ``ValueError`` listing every bad path, or, with ``skip_bad``,
    are dropped from their dataset with a warning (a dataset left empty still fails the
    training-set check).
    """
    datasets = {
        name: getattr(datamodule, name, None) for name in ("train_data", "val_data", "test_data")
    }
    datasets = {name: data for name, data in datasets.items() if getattr(data, "samples", None) is not None}
    paths = sorted({str(path) for data in datasets.values() for path in data.samples["image_path"]})
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(tqdm(pool.map(image_problem, paths), total=len(paths), desc="Checking images",
                            unit="img", disable=not progress, delay=2.0))
    problems = {path: problem for path, problem in zip(paths, results, strict=True) if problem is not None}
    if not problems:
        return problems
    listing = "\n".join(f"  {path}: {problem}" for path, problem in problems.items())
    if not skip_bad:
        msg = (
            f"{len(problems)} of {len(paths)} image(s) of {describe_datamodule(datamodule)} cannot be read "
            f"faithfully:\n{listing}\nFix or remove them, or set skip_bad_images=True to leave them out."
        )
        raise ValueError(msg)
    for data in datasets.values():
        keep = ~data.samples["image_path"].astype(str).isin(problems.keys())
        data.samples = data.samples[keep].reset_index(drop=True)
    logger.warning("Leaving out %d unreadable image(s) of %s:\n%s", len(problems),
                   describe_datamodule(datamodule), listing)
    return problems


def check_before_fit(datamodule: Any, skip_bad_images: bool = False) -> int:  # noqa: ANN401
    """Pre-flight image check, then the training-set check; the number of training images (-1: unknown)."""
    if datamodule is None:
        return -1
    check_image_files(datamodule, skip_bad=skip_bad_images)
    return require_training_images(datamodule)


def first_training_image(datamodule: Any, pre_processor: Any) -> torch.Tensor | None:  # noqa: ANN401
    """The first training image as the model sees it, ``(1, C, H, W)`` after ``pre_processor``'s transform.

    ``None`` when the datamodule has no indexable training set. Used to size the training set's
    embeddings (images x patches per image) before any of them is computed.
    """
    train_data = getattr(datamodule, "train_data", None)
    if train_data is None or len(train_data) == 0:
        return None
    image = train_data[0].image.unsqueeze(0)
    transform = getattr(pre_processor, "transform", None)
    return transform(image) if transform is not None else image
