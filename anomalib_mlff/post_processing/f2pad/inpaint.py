"""F2PAD's initial normal image X_N^0: the input with its initially masked region inpainted (paper III-E1).

The paper inpaints with a pretrained masked autoencoder (MAE). Offline, the default is a classical
inpainter (OpenCV's Telea or Navier-Stokes, or scikit-image's biharmonic); :class:`MAEInpainter` runs
an MAE when its checkpoint is at hand (e.g. the official ``mae_visualize_vit_large.pth``).
All inpainters map [0, 1] images ``(B, C, H, W)`` and masks ``(B, H, W)`` to [0, 1] images and keep
the unmasked pixels.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from skimage.restoration import inpaint_biharmonic
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F  # noqa: N812


class Inpainter(Protocol):
    """Fills the masked pixels of [0, 1] images."""

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` images, ``(B, H, W)`` masks -> inpainted images."""
        ...


class ClassicalInpainter:
    """OpenCV (``"telea"``, ``"ns"``) or scikit-image (``"biharmonic"``) inpainting, on the CPU."""

    _OPENCV_FLAGS = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}

    def __init__(self, method: str = "telea", radius: int = 3) -> None:
        if method not in {*self._OPENCV_FLAGS, "biharmonic"}:
            msg = f"method={method!r}; choose 'telea', 'ns' or 'biharmonic'."
            raise ValueError(msg)
        self.method = method
        self.radius = radius

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Inpaint each image where its mask is set."""
        pairs = zip(images.detach().cpu(), masks.cpu(), strict=True)
        filled = [self._inpaint_one(image, mask) for image, mask in pairs]
        return torch.stack(filled).to(images.device, images.dtype)

    def _inpaint_one(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not mask.any():
            return image
        pixels = image.permute(1, 2, 0).clamp(0, 1).numpy()
        hole = mask.numpy().astype(np.uint8)
        if self.method == "biharmonic":
            filled = inpaint_biharmonic(pixels, hole.astype(bool), channel_axis=-1)
        else:
            flag = self._OPENCV_FLAGS[self.method]
            eight_bit = np.ascontiguousarray(np.round(pixels * 255).astype(np.uint8))
            channels = [eight_bit] if eight_bit.shape[-1] in {1, 3} else np.split(eight_bit, eight_bit.shape[-1], -1)
            painted = [cv2.inpaint(part, hole, self.radius, flag).reshape(part.shape) for part in channels]
            filled = np.concatenate(painted, -1).astype(np.float32) / 255
        result = torch.from_numpy(np.asarray(filled, dtype=np.float32)).permute(2, 0, 1)
        return torch.where(mask, result, image)


_MAE_ARCHITECTURES: dict[str, dict[str, int]] = {
    "base": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16},
    "huge": {"patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16},
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class MaskedAutoencoder(nn.Module):
    """Masked autoencoder (He et al., 2022) for inpainting, with the official checkpoints' parameter names.

    Built from timm's ``PatchEmbed`` and ``Block``; predicts ImageNet-normalised pixels of every patch
    from the visible ones.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.image_size = image_size
        self.patch_embed = PatchEmbed(image_size, patch_size, 3, embed_dim)
        tokens = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, tokens, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * 3)

    def forward(self, image: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """One normalised image ``(3, S, S)`` and its visible patches ``(N,)`` bool -> predicted image."""
        tokens = self.patch_embed(image[None]) + self.pos_embed[:, 1:]
        cls = self.cls_token + self.pos_embed[:, :1]
        encoded = torch.cat([cls, tokens[:, visible]], 1)
        for block in self.blocks:
            encoded = block(encoded)
        encoded = self.decoder_embed(self.norm(encoded))
        sequence = self.mask_token.expand(1, tokens.shape[1], -1).clone()
        sequence[:, visible] = encoded[:, 1:]
        decoded = torch.cat([encoded[:, :1], sequence], 1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            decoded = block(decoded)
        patches = self.decoder_pred(self.decoder_norm(decoded))[0, 1:]
        return self._unpatchify(patches)

    def _unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        size = self.patch_embed.patch_size[0]
        grid = self.image_size // size
        image = patches.reshape(grid, grid, size, size, 3).permute(4, 0, 2, 1, 3)
        return image.reshape(3, self.image_size, self.image_size)


class MAEInpainter:
    """Inpaint with a masked autoencoder: patches touching the mask are hidden and predicted.

    Args:
        checkpoint: an official MAE checkpoint (``{"model": state_dict}``) or a plain state dict.
        architecture: ``"base"``, ``"large"`` (the visualisation checkpoint) or ``"huge"``, or keyword
            arguments of :class:`MaskedAutoencoder`.
        model: a ready :class:`MaskedAutoencoder` instead of a checkpoint.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        architecture: str | dict[str, Any] = "large",
        model: MaskedAutoencoder | None = None,
    ) -> None:
        if model is None:
            if checkpoint is None:
                msg = "MAEInpainter needs a checkpoint path (MAE weights cannot be downloaded here) or a model."
                raise ValueError(msg)
            kwargs = _MAE_ARCHITECTURES[architecture] if isinstance(architecture, str) else dict(architecture)
            model = MaskedAutoencoder(**kwargs)
            state = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("model", state))
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Inpaint each image where its mask is set."""
        self.model.to(images.device)
        size = self.model.image_size
        patch = self.model.patch_embed.patch_size[0]
        mean = torch.tensor(_IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        resized = (F.interpolate(rgb, size=(size, size), mode="bilinear", antialias=True) - mean) / std
        hidden = F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")
        hidden = F.max_pool2d(hidden, patch).flatten(1) > 0
        predicted = torch.stack([self.model(item, ~hide) for item, hide in zip(resized, hidden, strict=True)])
        predicted = F.interpolate(predicted * std + mean, size=images.shape[-2:], mode="bilinear").clamp(0, 1)
        if images.shape[1] == 1:
            predicted = predicted.mean(1, keepdim=True)
        return torch.where(masks[:, None], predicted.to(images.dtype), images)


def build_inpainter(inpainter: str | Inpainter) -> Inpainter:
    """An inpainter from a method name (``"telea"``, ``"ns"``, ``"biharmonic"``) or a ready instance."""
    return ClassicalInpainter(inpainter) if isinstance(inpainter, str) else inpainter
