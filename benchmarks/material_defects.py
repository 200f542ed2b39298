"""Defects made of material rather than flat colour, with exact masks, for bench_f2pad.py's realistic protocol.

Kinds after MVTec AD's texture categories, drawn on a normal grayscale image (``uint8``, ``H x W``) and
returned as an RGB ``uint8`` image with its mask: for the crack, the pixels it changed by at least
``MIN_CHANGE`` grey levels; for the blob kinds, the blob's core (blend weight >= 0.5), the region an
inspector would outline. A draw whose masked pixels change by less than ``MIN_CHANGE`` on average (a
worn patch on a flat surface, say) is redrawn:

- ``crack``: a thin branching random-walk line that darkens the material (x0.35-0.6);
- ``contamination``: a smooth-edged blob of a foreign material (a crop of another scikit-image photo);
- ``worn``: a blob where the texture is smoothed and its contrast halved (the surface wears flat);
- ``colour_shift``: a blob tinted warm or cool, brightness kept (discolouration).

None of them is a flat colour patch, none is drawn by F2PAD's own calibration (CutPaste, scar, confetti)
nor by the embedded data's generator (scratch, stain, hole). Deterministic for a given generator.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from skimage import data as skdata

MIN_CHANGE = 12  # grey levels (of 255)


def _blob(shape: tuple[int, int], rng: np.random.Generator, radius: tuple[float, float]) -> np.ndarray:
    """A smooth random blob in [0, 1] (soft edge), centred away from the border."""
    height, width = shape
    noise = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), 6)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    centre = rng.uniform(0.3, 0.7, size=2) * (height, width)
    axes = rng.uniform(*radius, size=2) * min(height, width)
    distance = np.sqrt(((rows - centre[0]) / axes[0]) ** 2 + ((cols - centre[1]) / axes[1]) ** 2)
    field = 1.0 - distance + 0.6 * noise / (np.abs(noise).max() + 1e-6)
    return np.clip(cv2.GaussianBlur((field > 0).astype(np.float32), (0, 0), 1.5), 0, 1)


def _crack(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = gray.shape
    shade = np.zeros(gray.shape, np.float32)
    point = rng.uniform(0.25, 0.75, size=2) * (width, height)
    angle = rng.uniform(0, 2 * np.pi)
    branches = [(point, angle)]
    for _ in range(int(rng.integers(2, 4))):
        point, angle = branches[int(rng.integers(len(branches)))]
        for _ in range(int(rng.integers(8, 16))):
            angle += rng.normal(0, 0.35)
            step = rng.uniform(2, 4) * np.array([np.cos(angle), np.sin(angle)])
            nxt = np.clip(point + step, 1, (width - 2, height - 2))
            cv2.line(shade, tuple(np.rint(point).astype(int)), tuple(np.rint(nxt).astype(int)), 1.0, 1)
            point = nxt
        branches.append((point, angle + rng.choice([-1, 1]) * 0.8))
    shade = cv2.GaussianBlur(shade, (0, 0), 0.6)
    factor = 1.0 - (1.0 - rng.uniform(0.35, 0.6)) * np.clip(shade * 1.5, 0, 1)
    image = gray.astype(np.float32)
    return np.repeat((image * factor)[..., None], 3, -1), image * (1 - factor) >= MIN_CHANGE


def _contamination(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    foreign = skdata.camera() if rng.random() < 0.5 else cv2.cvtColor(skdata.coffee(), cv2.COLOR_RGB2GRAY)
    top = int(rng.integers(0, foreign.shape[0] - gray.shape[0]))
    left = int(rng.integers(0, foreign.shape[1] - gray.shape[1]))
    patch = foreign[top : top + gray.shape[0], left : left + gray.shape[1]].astype(np.float32)
    alpha = _blob(gray.shape, rng, (0.08, 0.18))
    mixed = alpha * patch + (1 - alpha) * gray.astype(np.float32)
    return np.repeat(mixed[..., None], 3, -1), alpha >= 0.5


def _worn(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    image = gray.astype(np.float32)
    local_mean = cv2.GaussianBlur(image, (0, 0), 6)
    flattened = local_mean + 0.5 * (cv2.GaussianBlur(image, (0, 0), 2.5) - local_mean)
    alpha = _blob(gray.shape, rng, (0.1, 0.22))
    return np.repeat((alpha * flattened + (1 - alpha) * image)[..., None], 3, -1), alpha >= 0.5


def _colour_shift(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    image = np.repeat(gray.astype(np.float32)[..., None], 3, -1)
    strength = rng.uniform(0.2, 0.35) * rng.choice([-1, 1])
    tint = np.array([1 + strength, 1.0, 1 - strength], np.float32)
    alpha = _blob(gray.shape, rng, (0.1, 0.22))
    return alpha[..., None] * image * tint + (1 - alpha[..., None]) * image, alpha >= 0.5


MATERIAL_DEFECTS: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "crack": _crack,
    "contamination": _contamination,
    "worn": _worn,
    "colour_shift": _colour_shift,
}


def material_defect(gray: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(RGB ``uint8`` defective image, boolean mask) for one defect ``kind`` on a grayscale ``uint8`` image."""
    while True:
        drawn, mask = MATERIAL_DEFECTS[kind](gray, rng)
        defective = np.clip(np.rint(drawn), 0, 255).astype(np.uint8)
        change = np.abs(defective.astype(np.int16) - gray[..., None].astype(np.int16)).max(-1)
        if mask.any() and change[mask].mean() >= MIN_CHANGE:
            return defective, mask
