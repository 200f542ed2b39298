"""Pseudo anomalies that turn normal training images into supervised ones.

MLFF (Tang et al., 2025) trains on normal images with synthetic defects and their pixel masks:

- :func:`confetti_noise` (FCDD, Liznerski et al. 2021): rotated square blobs of random colour, plus
  white ones, summed, Gaussian-blurred and added to the image.
- :func:`cut_paste` (CutPaste, Li et al. 2021): a colour-jittered rectangle cut from the image
  and pasted elsewhere.
- :func:`cut_paste_scar`: CutPaste's thin, rotated "scar" variant (MFFA's 3-way pretext task).

All functions take float images in ``[0, 1]``, shaped ``(C, H, W)`` or ``(B, C, H, W)``, and an
optional ``torch.Generator`` (CPU) for reproducible draws. They return ``(images, masks)`` where
``masks`` is ``(1, H, W)`` / ``(B, 1, H, W)``, float, and exactly 1 where a pixel changed.
Pixels a method does not touch keep their exact input value.

Defects for test sets with exact masks (the embedded data's, the evaluation protocols') are the
numpy side of the same family, in :mod:`anomalib_mlff.components.defects`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import rotate
from torch import Tensor
from torchvision.transforms.v2 import functional as TF  # noqa: N812

__all__ = [
    "PSEUDO_ANOMALY_METHODS",
    "PseudoAnomalyGenerator",
    "confetti_noise",
    "cut_paste",
    "cut_paste_scar",
]

#: Tolerance on the ``[0, 1]`` input range (float round trips through normalisation).
_RANGE_TOLERANCE = 1e-3
#: Noise is rounded to 8-bit steps, as FCDD adds it to uint8 images: sub-step changes are no change.
_QUANTUM = 1.0 / 255.0


# ----------------------------------------------------------------------------- random draws
def _uniform(low: float, high: float, generator: torch.Generator | None, size: Sequence[int] = ()) -> Tensor:
    """Uniform samples in ``[low, high)`` drawn on the CPU (where the generator lives)."""
    return low + (high - low) * torch.rand(tuple(size), generator=generator)


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """One integer in ``[low, high]`` (both inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


# ----------------------------------------------------------------------------- shared helpers
def _check_images(images: Tensor) -> None:
    """Reject tensors that are not float ``(C,H,W)``/``(B,C,H,W)`` images in ``[0, 1]``."""
    if not isinstance(images, Tensor) or images.ndim not in {3, 4}:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        msg = f"images must be a (C, H, W) or (B, C, H, W) tensor, got {shape}."
        raise ValueError(msg)
    if not images.is_floating_point():
        msg = f"images must be a float tensor with values in [0, 1], got dtype {images.dtype}."
        raise ValueError(msg)
    if images.numel() == 0:
        return
    low, high = float(images.min()), float(images.max())
    if not (low >= -_RANGE_TOLERANCE and high <= 1 + _RANGE_TOLERANCE):  # also catches NaN
        msg = (
            f"images must hold [0, 1] pixel values (un-normalised), got values in [{low:.4g}, {high:.4g}]. "
            "Apply pseudo anomalies before ImageNet normalisation."
        )
        raise ValueError(msg)


def _changed_mask(original: Tensor, modified: Tensor) -> Tensor:
    """``(…, 1, H, W)`` float mask of pixels where any channel differs."""
    return (modified != original).any(dim=-3, keepdim=True).to(original.dtype)


def _per_image(
    images: Tensor,
    corrupt: Callable[[Tensor, torch.Generator | None], Tensor],
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Apply a single-image corruption to ``(C,H,W)`` or every image of ``(B,C,H,W)``; add masks."""
    _check_images(images)
    if images.ndim == 3:
        corrupted = corrupt(images, generator)
    else:
        corrupted = torch.stack([corrupt(image, generator) for image in images]) if len(images) else images.clone()
    return corrupted, _changed_mask(images, corrupted)


def _jitter_colours(patch: Tensor, strength: float, generator: torch.Generator | None) -> Tensor:
    """torchvision ``ColorJitter(strength, strength, strength, strength)`` with generator-drawn factors.

    ``ColorJitter`` itself draws from the global RNG; its factors are drawn here instead so a
    seeded generator reproduces the result. Saturation and hue need RGB and are skipped otherwise.
    """
    if strength <= 0:
        return patch
    adjustments: list[Callable[[Tensor], Tensor]] = []
    brightness, contrast, saturation = (1 + _uniform(-strength, strength, generator, (3,))).tolist()
    hue = float(_uniform(-min(strength, 0.5), min(strength, 0.5), generator))
    adjustments.append(lambda x: TF.adjust_brightness(x, brightness))
    adjustments.append(lambda x: TF.adjust_contrast(x, contrast))
    if patch.shape[0] == 3:
        adjustments.append(lambda x: TF.adjust_saturation(x, saturation))
        adjustments.append(lambda x: TF.adjust_hue(x, hue))
    for index in torch.randperm(len(adjustments), generator=generator).tolist():
        patch = adjustments[index](patch)
    return patch.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- confetti noise
def _square_blobs(
    height: int,
    width: int,
    sizes: list[int],
    centres: list[tuple[int, int]],
    angles: Tensor,
    device: torch.device,
) -> Tensor:
    """``(n, H, W)`` binary masks of squares rotated about their centres (kornia, nearest)."""
    pad = math.ceil(max(sizes) * math.sqrt(2) / 2) + 1  # rotated squares fit before the crop
    canvas = torch.zeros(len(sizes), 1, height + 2 * pad, width + 2 * pad, device=device)
    for index, (size, (row, col)) in enumerate(zip(sizes, centres, strict=True)):
        top, left = row + pad - size // 2, col + pad - size // 2
        canvas[index, 0, top : top + size, left : left + size] = 1.0
    xy_centres = [[col + pad, row + pad] for row, col in centres]
    rotation_centres = torch.tensor(xy_centres, dtype=torch.float32, device=device)
    rotated = rotate(canvas, angles.to(device), center=rotation_centres, mode="nearest")
    return rotated[:, 0, pad : pad + height, pad : pad + width]


def _confetti_one(
    image: Tensor,
    generator: torch.Generator | None,
    blob_size: tuple[int, int],
    colour_blobs: tuple[int, int],
    white_blobs: tuple[int, int],
    sigma: float,
) -> Tensor:
    channels, height, width = image.shape
    n_colour, n_white = _randint(*colour_blobs, generator), _randint(*white_blobs, generator)
    count = n_colour + n_white
    if count == 0:
        return image.clone()
    largest = min(blob_size[1], height, width)
    sizes = [_randint(min(blob_size[0], largest), largest, generator) for _ in range(count)]
    centres = [(_randint(0, height - 1, generator), _randint(0, width - 1, generator)) for _ in range(count)]
    angles = _uniform(-45.0, 45.0, generator, (count,))  # a square repeats every 90 degrees
    colours = torch.cat([_uniform(-1.0, 1.0, generator, (n_colour, channels)), torch.ones(n_white, channels)])
    blobs = _square_blobs(height, width, sizes, centres, angles, image.device)
    noise = torch.einsum("nhw,nc->chw", blobs, colours.to(image.device, image.dtype))
    kernel = 2 * math.ceil(2.4 * sigma) + 1  # 25 for sigma 5, as FCDD
    noise = gaussian_blur2d(noise[None], (kernel, kernel), (sigma, sigma), border_type="constant")[0]
    noise = torch.round(noise / _QUANTUM) * _QUANTUM
    return torch.where(noise != 0, (image + noise).clamp(0.0, 1.0), image)


def confetti_noise(
    images: Tensor,
    generator: torch.Generator | None = None,
    blob_size: tuple[int, int] = (8, 54),
    colour_blobs: tuple[int, int] = (1, 3),
    white_blobs: tuple[int, int] = (0, 2),
    sigma: float = 5.0,
) -> tuple[Tensor, Tensor]:
    """FCDD confetti noise: blurred, rotated square blobs added to the image.

    Each image gets ``colour_blobs`` (inclusive range) blobs of a random per-channel colour in
    ``[-1, 1]`` and ``white_blobs`` white (+1) ones, side ``blob_size`` px (capped by the image),
    rotated by U(-45, 45) degrees. The sum is blurred (sigma 5) and rounded to 8-bit steps, so the
    mask marks the pixels whose 8-bit value changed, as with FCDD's uint8 images.
    """
    if not 1 <= blob_size[0] <= blob_size[1]:
        msg = f"blob_size must be (min, max) with 1 <= min <= max, got blob_size={blob_size}."
        raise ValueError(msg)
    for name, value in (("colour_blobs", colour_blobs), ("white_blobs", white_blobs)):
        if not 0 <= value[0] <= value[1]:
            msg = f"{name} must be (min, max) counts with 0 <= min <= max, got {name}={value}."
            raise ValueError(msg)
    if sigma <= 0:
        msg = f"sigma must be positive, got sigma={sigma}."
        raise ValueError(msg)

    def corrupt(image: Tensor, gen: torch.Generator | None) -> Tensor:
        return _confetti_one(image, gen, blob_size, colour_blobs, white_blobs, sigma)

    return _per_image(images, corrupt, generator)


# ----------------------------------------------------------------------------- CutPaste
def _cut_paste_one(
    image: Tensor,
    generator: torch.Generator | None,
    area_ratio: tuple[float, float],
    aspect_ratio: tuple[float, float],
    jitter: float,
) -> Tensor:
    _, height, width = image.shape
    area = float(_uniform(*area_ratio, generator)) * height * width
    ratio = math.exp(float(_uniform(math.log(aspect_ratio[0]), math.log(aspect_ratio[1]), generator)))
    patch_w = min(width, max(1, round(math.sqrt(area * ratio))))
    patch_h = min(height, max(1, round(math.sqrt(area / ratio))))
    src_top, src_left = _randint(0, height - patch_h, generator), _randint(0, width - patch_w, generator)
    dst_top, dst_left = _randint(0, height - patch_h, generator), _randint(0, width - patch_w, generator)
    patch = _jitter_colours(image[:, src_top : src_top + patch_h, src_left : src_left + patch_w], jitter, generator)
    result = image.clone()
    result[:, dst_top : dst_top + patch_h, dst_left : dst_left + patch_w] = patch
    return result


def cut_paste(
    images: Tensor,
    generator: torch.Generator | None = None,
    area_ratio: tuple[float, float] = (0.02, 0.15),
    aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
    jitter: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """CutPaste: cut a rectangle (``area_ratio`` of the image, log-uniform ``aspect_ratio``),
    colour-jitter it and paste it at a random place.

    The mask is the pasted rectangle restricted to pixels whose value changed (a patch pasted
    onto identical content is no anomaly).
    """
    if not 0 < area_ratio[0] <= area_ratio[1] <= 1:
        msg = f"area_ratio must satisfy 0 < min <= max <= 1, got area_ratio={area_ratio}."
        raise ValueError(msg)
    if not 0 < aspect_ratio[0] <= aspect_ratio[1]:
        msg = f"aspect_ratio must satisfy 0 < min <= max, got aspect_ratio={aspect_ratio}."
        raise ValueError(msg)

    def corrupt(image: Tensor, gen: torch.Generator | None) -> Tensor:
        return _cut_paste_one(image, gen, area_ratio, aspect_ratio, jitter)

    return _per_image(images, corrupt, generator)


def _scar_one(
    image: Tensor,
    generator: torch.Generator | None,
    width_range: tuple[int, int],
    height_range: tuple[int, int],
    rotation: tuple[float, float],
    jitter: float,
) -> Tensor:
    channels, height, width = image.shape
    scar_w = min(width, _randint(*width_range, generator))
    scar_h = min(height, _randint(*height_range, generator))
    angle = _uniform(*rotation, generator, (1,))
    src_top, src_left = _randint(0, height - scar_h, generator), _randint(0, width - scar_w, generator)
    patch = _jitter_colours(image[:, src_top : src_top + scar_h, src_left : src_left + scar_w], jitter, generator)
    # Put patch + alpha on a square canvas large enough for any rotation, rotate both (nearest).
    side = math.ceil(math.hypot(scar_w, scar_h)) + 1
    canvas = torch.zeros(1, channels + 1, side, side, dtype=image.dtype, device=image.device)
    top, left = (side - scar_h) // 2, (side - scar_w) // 2
    canvas[0, :channels, top : top + scar_h, left : left + scar_w] = patch
    canvas[0, channels, top : top + scar_h, left : left + scar_w] = 1.0
    canvas = rotate(canvas, angle.to(image.device, image.dtype), mode="nearest")[0]
    # Paste at a random place; the canvas is cropped where it would leave the image.
    dst_top = _randint(0, max(height - side, 0), generator)
    dst_left = _randint(0, max(width - side, 0), generator)
    rows, cols = min(side, height - dst_top), min(side, width - dst_left)
    canvas = canvas[:, :rows, :cols]
    result = image.clone()
    region = result[:, dst_top : dst_top + rows, dst_left : dst_left + cols]
    result[:, dst_top : dst_top + rows, dst_left : dst_left + cols] = torch.where(
        canvas[channels:] > 0.5, canvas[:channels], region
    )
    return result


def cut_paste_scar(
    images: Tensor,
    generator: torch.Generator | None = None,
    width: tuple[int, int] = (2, 16),
    height: tuple[int, int] = (10, 25),
    rotation: tuple[float, float] = (-45.0, 45.0),
    jitter: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """CutPaste-Scar: a thin ``width`` x ``height`` px patch, colour-jittered, rotated by
    ``rotation`` degrees and pasted at a random place. The mask is the scar's changed pixels.
    """
    for name, value in (("width", width), ("height", height)):
        if not 1 <= value[0] <= value[1]:
            msg = f"{name} must be (min, max) pixels with 1 <= min <= max, got {name}={value}."
            raise ValueError(msg)

    def corrupt(image: Tensor, gen: torch.Generator | None) -> Tensor:
        return _scar_one(image, gen, width, height, rotation, jitter)

    return _per_image(images, corrupt, generator)


# ----------------------------------------------------------------------------- mixing
PSEUDO_ANOMALY_METHODS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "confetti": confetti_noise,
    "cutpaste": cut_paste,
    "scar": cut_paste_scar,
}


class PseudoAnomalyGenerator:
    """Give each image of a batch a pseudo anomaly with probability ``ratio``.

    The method for an image is drawn uniformly from ``methods`` (names in
    :data:`PSEUDO_ANOMALY_METHODS`). The paper uses confetti noise and CutPaste with ratio 0.5.

    Example:
        >>> generator = PseudoAnomalyGenerator(ratio=0.5)
        >>> images, masks = generator(torch.rand(4, 3, 64, 64), torch.Generator().manual_seed(0))
    """

    def __init__(self, ratio: float = 0.5, methods: Sequence[str] = ("confetti", "cutpaste")) -> None:
        if not 0.0 <= ratio <= 1.0:
            msg = f"ratio must be in [0, 1], got ratio={ratio}."
            raise ValueError(msg)
        methods = (methods,) if isinstance(methods, str) else tuple(methods)
        unknown = [name for name in methods if name not in PSEUDO_ANOMALY_METHODS]
        if not methods or unknown:
            msg = f"methods must be a non-empty subset of {sorted(PSEUDO_ANOMALY_METHODS)}, got methods={methods}."
            raise ValueError(msg)
        self.ratio = float(ratio)
        self.methods = methods

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Return ``(images, masks)``; ``masks`` is ``(B, 1, H, W)`` and 0 on untouched images."""
        _check_images(images)
        if images.ndim != 4:
            msg = f"images must be a (B, C, H, W) batch, got shape {tuple(images.shape)}."
            raise ValueError(msg)
        chosen = (torch.rand(len(images), generator=generator) < self.ratio).tolist()
        picks = torch.randint(len(self.methods), (len(images),), generator=generator).tolist()
        corrupted = images.clone()
        for index, (selected, pick) in enumerate(zip(chosen, picks, strict=True)):
            if selected:
                corrupted[index] = PSEUDO_ANOMALY_METHODS[self.methods[pick]](images[index], generator)[0]
        return corrupted, _changed_mask(images, corrupted)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, methods={self.methods})"
