"""Build the embedded demo dataset ("mini MVTec") from texture photos that ship with scikit-image.

Layout is MVTec AD's, so anomalib's own ``MVTecAD`` and ``Folder`` datamodules read it:
``<root>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}``. Normal
images are random crops (with flips) of one texture photo: training crops from its upper part,
test crops from its lower part. Each defect image gets one of
:mod:`anomalib_mlff.components.defects`' surface defects with its exact ground-truth mask (the
pixels a scratch or hole replaced, where a stain darkens by >= 15%).
Deterministic for a given seed.

Run ``python -m anomalib_mlff.data.build OUT_DIR`` to rebuild; the shipped copy was made with
the defaults.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
from skimage import data as skdata

from anomalib_mlff.components.defects import SURFACE_DEFECTS, hole, random_crop

CROP = 128
# category -> (skimage loader of the normal texture, skimage loader of the foreign texture for holes)
TEXTURES: dict[str, tuple[str, str]] = {"brick": ("brick", "gravel"), "grass": ("grass", "brick")}


@dataclass(frozen=True)
class SplitSizes:
    """How many images each part of a category gets."""

    train_good: int = 60
    test_good: int = 12
    per_defect: int = 8


def _crop(texture: np.ndarray, rng: np.random.Generator, rows: tuple[int, int]) -> np.ndarray:
    return random_crop(texture, rng, rows, CROP)


def _load_gray(name: str) -> np.ndarray:
    image = getattr(skdata, name)()
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        msg = f"Could not write {path}"
        raise OSError(msg)


def build_category(root: Path, category: str, sizes: SplitSizes = SplitSizes(), seed: int = 0) -> Path:
    """Write one category under ``root`` and return its folder."""
    texture_name, foreign_name = TEXTURES[category]
    texture, foreign = _load_gray(texture_name), _load_gray(foreign_name)
    split_row = int(texture.shape[0] * 0.6)
    rng = np.random.default_rng([seed, sorted(TEXTURES).index(category)])
    folder = root / category
    for index in range(sizes.train_good):
        _write(folder / "train" / "good" / f"{index:03d}.png", _crop(texture, rng, (0, split_row)))
    for index in range(sizes.test_good):
        _write(folder / "test" / "good" / f"{index:03d}.png", _crop(texture, rng, (split_row, texture.shape[0])))
    defects = {**SURFACE_DEFECTS, "hole": partial(hole, foreign=foreign)}
    for defect, make_defect in defects.items():
        written = 0
        while written < sizes.per_defect:
            normal = _crop(texture, rng, (split_row, texture.shape[0]))
            defective, changed = make_defect(normal, rng)
            if not changed.any():  # the defect happened to match the background: draw again
                continue
            mask = changed.astype(np.uint8) * 255
            _write(folder / "test" / defect / f"{written:03d}.png", defective)
            _write(folder / "ground_truth" / defect / f"{written:03d}_mask.png", mask)
            written += 1
    return folder


def build(root: Path, categories: tuple[str, ...] = tuple(TEXTURES), seed: int = 0) -> Path:
    """Write every category under ``root``."""
    for category in categories:
        build_category(root, category, seed=seed)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.root, seed=args.seed))


if __name__ == "__main__":
    main()
