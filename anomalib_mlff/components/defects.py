"""Synthetic defects with exact masks, drawn on numpy images: the test-set side of the defect family.

Training-time pseudo anomalies (confetti noise, CutPaste, scar: batched torch tensors, a
``torch.Generator``) are in :mod:`anomalib_mlff.components.pseudo_anomaly`. The defects here build
test sets whose masks are exact, so a localisation method can be scored against them: the embedded
demo data (:mod:`anomalib_mlff.data.build`) and the evaluation protocols
(:mod:`anomalib_mlff.evaluation.protocols`). None of them is drawn by a training-time generator, so
a model or F2PAD's calibration never sees them before the test.

Every kind in :data:`DEFECTS` takes a grayscale ``uint8`` ``H x W`` image and a
``numpy.random.Generator`` and returns ``(defective image, boolean mask)``; the hole also needs a
``foreign`` texture to fill it with. Deterministic for a given generator.

- Surface defects (the embedded data): ``scratch`` (a thin bright or dark polyline; the mask is
  every pixel it changed), ``stain`` (a darkened soft-edged ellipse; the mask is where it darkens by
  at least 15%), ``hole`` (a polygon filled with a foreign texture; the mask is the polygon).
- Material defects (RGB output; :func:`material_defect` redraws a draw whose masked pixels change by
  less than ``MIN_CHANGE`` grey levels on average): ``crack`` (a thin branching random-walk line that
  darkens the material x0.35-0.6; the mask is where it changed by at least ``MIN_CHANGE``),
  ``contamination`` (a smooth-edged blob of a foreign photo), ``worn`` (a blob where the texture is
  smoothed and its contrast halved), ``colour_shift`` (a blob tinted warm or cool). The blob kinds'
  mask is the blob's core (blend weight >= 0.5), the region an inspector would outline.
- :func:`flat_colour_paste`: F2PAD's cut-paste defect (F2PAD paper, Eq. 16), one random colour in
  the shape of a real defect mask, on float RGB images in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image
from skimage import data as skdata

__all__ = [
    "DEFECTS",
    "MATERIAL_DEFECTS",
    "MIN_CHANGE",
    "MIN_COLOUR_DISTANCE",
    "SURFACE_DEFECTS",
    "crack",
    "flat_colour_paste",
    "hole",
    "material_defect",
    "random_crop",
    "scratch",
    "stain",
]

Defect = Callable[..., tuple[np.ndarray, np.ndarray]]

#: Grey levels (of 255) a material defect must change its masked pixels by, on average.
MIN_CHANGE = 12
#: RGB distance in [0, 1] below which a flat-colour paste's colour is redrawn (too close to what it covers).
MIN_COLOUR_DISTANCE = 0.3
#: Range of the factor that rescales a flat-colour paste's mask shape.
PASTE_SCALE = (0.75, 1.5)


# ----------------------------------------------------------------------------- shared helpers
def random_crop(texture: np.ndarray, rng: np.random.Generator, rows: tuple[int, int], size: int) -> np.ndarray:
    """A ``size`` x ``size`` crop of ``texture`` whose rows lie in ``rows``, flipped at random both ways."""
    top = int(rng.integers(rows[0], rows[1] - size + 1))
    left = int(rng.integers(0, texture.shape[1] - size + 1))
    patch = texture[top : top + size, left : left + size]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1, :]
    return np.ascontiguousarray(patch)


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


# ----------------------------------------------------------------------------- surface defects
def scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin bright (dark on bright images) polyline of 2-3 px; the mask is every pixel it changed."""
    side = min(image.shape)
    out = image.copy()
    points = np.cumsum(rng.integers(-18, 19, size=(4, 2)), axis=0) + rng.integers(30, side - 30, size=2)
    points = np.clip(points, 2, side - 3).astype(np.int32)
    value = 250 if image.mean() < 128 else 5
    cv2.polylines(out, [points.reshape(-1, 1, 2)], isClosed=False, color=value, thickness=int(rng.integers(2, 4)))
    return out, out != image


def stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A darkened ellipse with a soft edge; the mask is where it darkens by at least 15%."""
    side = min(image.shape)
    shade = np.zeros(image.shape, np.float32)
    centre = tuple(int(c) for c in rng.integers(25, side - 25, size=2))
    axes = tuple(int(a) for a in rng.integers(8, 20, size=2))
    cv2.ellipse(shade, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, thickness=-1)
    shade = cv2.GaussianBlur(shade, (0, 0), 2.0)
    out = np.clip(np.rint(image.astype(np.float32) * (1.0 - 0.6 * shade)), 0, 255).astype(np.uint8)
    return out, shade >= 0.25


def hole(image: np.ndarray, rng: np.random.Generator, foreign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A polygon filled with a random crop of the ``foreign`` texture; the mask is the polygon."""
    side = min(image.shape)
    out = image.copy()
    centre = rng.integers(30, side - 30, size=2)
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=7))
    radii = rng.uniform(8, 20, size=7)
    polygon = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], axis=1)
    region = np.zeros(image.shape, np.uint8)
    cv2.fillPoly(region, [np.rint(polygon).astype(np.int32).reshape(-1, 1, 2)], 1)
    filler = random_crop(foreign, rng, (0, foreign.shape[0]), side)
    out[region > 0] = filler[region > 0]
    return out, region > 0


#: Surface defects of the embedded demo data, in the order its builder draws them.
SURFACE_DEFECTS: dict[str, Defect] = {"scratch": scratch, "stain": stain, "hole": hole}


# ----------------------------------------------------------------------------- material defects
def crack(gray: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin branching random-walk line that darkens the material; RGB float image and mask."""
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


def contamination(gray: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A smooth-edged blob of a foreign material (a crop of another scikit-image photo)."""
    foreign = skdata.camera() if rng.random() < 0.5 else cv2.cvtColor(skdata.coffee(), cv2.COLOR_RGB2GRAY)
    top = int(rng.integers(0, foreign.shape[0] - gray.shape[0]))
    left = int(rng.integers(0, foreign.shape[1] - gray.shape[1]))
    patch = foreign[top : top + gray.shape[0], left : left + gray.shape[1]].astype(np.float32)
    alpha = _blob(gray.shape, rng, (0.08, 0.18))
    mixed = alpha * patch + (1 - alpha) * gray.astype(np.float32)
    return np.repeat(mixed[..., None], 3, -1), alpha >= 0.5


def worn(gray: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A blob where the texture is smoothed and its contrast halved (the surface wears flat)."""
    image = gray.astype(np.float32)
    local_mean = cv2.GaussianBlur(image, (0, 0), 6)
    flattened = local_mean + 0.5 * (cv2.GaussianBlur(image, (0, 0), 2.5) - local_mean)
    alpha = _blob(gray.shape, rng, (0.1, 0.22))
    return np.repeat((alpha * flattened + (1 - alpha) * image)[..., None], 3, -1), alpha >= 0.5


def colour_shift(gray: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A blob tinted warm or cool, brightness kept (discolouration)."""
    image = np.repeat(gray.astype(np.float32)[..., None], 3, -1)
    strength = rng.uniform(0.2, 0.35) * rng.choice([-1, 1])
    tint = np.array([1 + strength, 1.0, 1 - strength], np.float32)
    alpha = _blob(gray.shape, rng, (0.1, 0.22))
    return alpha[..., None] * image * tint + (1 - alpha[..., None]) * image, alpha >= 0.5


#: Material defects, drawn through :func:`material_defect`.
MATERIAL_DEFECTS: dict[str, Defect] = {
    "crack": crack,
    "contamination": contamination,
    "worn": worn,
    "colour_shift": colour_shift,
}

#: Every numpy defect kind by name.
DEFECTS: dict[str, Defect] = {**SURFACE_DEFECTS, **MATERIAL_DEFECTS}


def material_defect(gray: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(RGB ``uint8`` defective image, boolean mask) for one material defect ``kind`` on a grayscale image."""
    if kind not in MATERIAL_DEFECTS:
        msg = f"kind must be one of {sorted(MATERIAL_DEFECTS)}, got kind={kind!r}."
        raise ValueError(msg)
    while True:
        drawn, mask = MATERIAL_DEFECTS[kind](gray, rng)
        defective = np.clip(np.rint(drawn), 0, 255).astype(np.uint8)
        change = np.abs(defective.astype(np.int16) - gray[..., None].astype(np.int16)).max(-1)
        if mask.any() and change[mask].mean() >= MIN_CHANGE:
            return defective, mask


# ----------------------------------------------------------------------------- flat-colour paste
def flat_colour_paste(
    normal: np.ndarray, mask_source: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """F2PAD's cut-paste defect (Eq. 16): ``X = (1 - M) X_normal + M A``, ``A`` one random colour.

    ``M`` is the bounding box of the binary ``mask_source`` (a real defect mask), rescaled by a factor
    in ``PASTE_SCALE``, flipped left-right with probability 0.5 and placed at random; a colour closer
    than ``MIN_COLOUR_DISTANCE`` to the covered pixels is redrawn. ``normal`` is float RGB in [0, 1].
    """
    if not mask_source.any():
        msg = "mask_source must mark at least one pixel."
        raise ValueError(msg)
    rows, cols = np.nonzero(mask_source)
    shape = mask_source[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = normal.shape[:2]
    scale = rng.uniform(*PASTE_SCALE)
    new_size = (
        max(2, min(width - 2, round(shape.shape[1] * scale))),
        max(2, min(height - 2, round(shape.shape[0] * scale))),
    )
    shape = np.asarray(Image.fromarray(shape.astype(np.uint8) * 255).resize(new_size, Image.NEAREST)) > 0
    if rng.random() < 0.5:
        shape = shape[:, ::-1]
    top = rng.integers(0, height - shape.shape[0] + 1)
    left = rng.integers(0, width - shape.shape[1] + 1)
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + shape.shape[0], left : left + shape.shape[1]] = shape
    while True:
        colour = rng.random(3)
        if np.linalg.norm(normal[mask] - colour, axis=1).mean() >= MIN_COLOUR_DISTANCE:
            break
    defective = np.where(mask[..., None], colour, normal)
    return defective, mask
