"""Build the embedded demo dataset ("mini MVTec") from texture photos that ship with scikit-image.

Layout is MVTec AD's, so anomalib's own ``MVTecAD`` and ``Folder`` datamodules read it:
``<root>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}``. Normal
images are random crops (with flips) of one texture photo: training crops from its upper part,
test crops from its lower part. Each defect image gets a synthetic defect with an exact
ground-truth mask (the pixels a scratch or hole replaced, where a stain darkens by >= 15%).
Deterministic for a given seed.

Run ``python -m anomalib_mlff.data.build OUT_DIR`` to rebuild; the shipped copy was made with
the defaults.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from skimage import data as skdata

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
    top = int(rng.integers(rows[0], rows[1] - CROP + 1))
    left = int(rng.integers(0, texture.shape[1] - CROP + 1))
    patch = texture[top : top + CROP, left : left + CROP]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1, :]
    return np.ascontiguousarray(patch)


def _scratch(image: np.ndarray, rng: np.random.Generator, _foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A thin bright or dark polyline; the mask is every pixel it changed."""
    out = image.copy()
    points = np.cumsum(rng.integers(-18, 19, size=(4, 2)), axis=0) + rng.integers(30, CROP - 30, size=2)
    points = np.clip(points, 2, CROP - 3).astype(np.int32)
    value = 250 if image.mean() < 128 else 5
    cv2.polylines(out, [points.reshape(-1, 1, 2)], isClosed=False, color=value, thickness=int(rng.integers(2, 4)))
    return out, out != image


def _stain(image: np.ndarray, rng: np.random.Generator, _foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A darkened ellipse with a soft edge; the mask is where it darkens by at least 15%."""
    shade = np.zeros(image.shape, np.float32)
    centre = tuple(int(c) for c in rng.integers(25, CROP - 25, size=2))
    axes = tuple(int(a) for a in rng.integers(8, 20, size=2))
    cv2.ellipse(shade, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, thickness=-1)
    shade = cv2.GaussianBlur(shade, (0, 0), 2.0)
    out = np.clip(np.rint(image.astype(np.float32) * (1.0 - 0.6 * shade)), 0, 255).astype(np.uint8)
    return out, shade >= 0.25


def _hole(image: np.ndarray, rng: np.random.Generator, foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A polygon filled with a different texture; the mask is the polygon."""
    out = image.copy()
    centre = rng.integers(30, CROP - 30, size=2)
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=7))
    radii = rng.uniform(8, 20, size=7)
    polygon = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], axis=1)
    region = np.zeros(image.shape, np.uint8)
    cv2.fillPoly(region, [np.rint(polygon).astype(np.int32).reshape(-1, 1, 2)], 1)
    filler = _crop(foreign, rng, (0, foreign.shape[0]))
    out[region > 0] = filler[region > 0]
    return out, region > 0


DEFECTS: dict[str, Callable[[np.ndarray, np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "stain": _stain,
    "hole": _hole,
}


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
    for defect, make_defect in DEFECTS.items():
        written = 0
        while written < sizes.per_defect:
            normal = _crop(texture, rng, (split_row, texture.shape[0]))
            defective, changed = make_defect(normal, rng, foreign)
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
