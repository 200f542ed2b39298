"""LGFFP: local-global feature fusion perception (MFFA, Fig. 3).

Shallow and middle CNN features are concatenated at one resolution (256 + 512 = 768 channels
for WideResNet-50), a random selection of as many deep-layer channels is added to them, and the
resulting tokens run through the first transformer blocks of a CaiT from timm, whose positional
embedding is resampled to the feature grid. The CaiT is used as is (frozen); the channel
selection is a buffer, so it is saved with the model and fixed by a seed.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.cait import Cait
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mlff.components.backbone import BackboneWeightsError

__all__ = ["LGFFP", "create_cait_blocks", "resize_to"]


def resize_to(features: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize of ``(B, C, h, w)`` features to ``size`` (identity when it already matches)."""
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    return F.interpolate(features, size=tuple(size), mode="bilinear", align_corners=False)


def _cait_widths() -> dict[str, int]:
    """Width of every CaiT variant timm knows (structure only, on the meta device)."""
    widths = {}
    for name in timm.list_models("cait_*"):
        with torch.device("meta"):
            widths[name] = timm.create_model(name, pretrained=False).embed_dim
    return widths


def create_cait_blocks(
    name: str,
    width: int,
    depth: int,
    pre_trained: bool,
    weights_path: str | None,
) -> tuple[Tensor, tuple[int, int], nn.Sequential]:
    """The positional embedding, its grid and the first ``depth`` blocks of a timm CaiT.

    Raises ``ValueError`` when ``name`` is not a CaiT, is not ``width`` wide or has fewer than
    ``depth`` blocks, and :class:`BackboneWeightsError` when its weights cannot be obtained.
    """
    if not isinstance(name, str) or not timm.is_model(name) or not name.startswith("cait"):
        msg = f"cait_backbone={name!r} is not a timm CaiT; choose one of {timm.list_models('cait_*')}."
        raise ValueError(msg)
    with torch.device("meta"):  # check the structure before allocating or downloading anything
        probe = timm.create_model(name, pretrained=False)
    if not isinstance(probe, Cait):
        msg = f"cait_backbone={name!r} is not a CaiT model ({type(probe).__name__})."
        raise ValueError(msg)
    if probe.embed_dim != width:
        fitting = sorted(variant for variant, dim in _cait_widths().items() if dim == width)
        msg = (
            f"cait_backbone={name!r} is {probe.embed_dim} wide, but LGFFP feeds it {width}-channel tokens "
            f"(the backbone's first two layers concatenated). CaiT variants {width} wide: {fitting or 'none'}; "
            "or pick a backbone whose first two layers have as many channels as the CaiT is wide."
        )
        raise ValueError(msg)
    if len(probe.blocks) < depth:
        msg = f"cait_blocks={depth} but {name!r} has only {len(probe.blocks)} transformer blocks."
        raise ValueError(msg)
    overlay = {"file": str(weights_path)} if weights_path is not None else None
    try:
        model = timm.create_model(
            name, pretrained=pre_trained or weights_path is not None, pretrained_cfg_overlay=overlay
        )
    except (OSError, RuntimeError) as error:
        msg = (
            f"Could not obtain the weights of CaiT {name!r} ({type(error).__name__}: {error}). Offline, pass "
            "cait_weights_path=<file with the timm CaiT's state_dict> (CLI: --model.cait_weights_path PATH), "
            "or pre_trained=False for a randomly initialised CaiT."
        )
        raise BackboneWeightsError(msg) from error
    grid = tuple(int(side) for side in model.patch_embed.grid_size)
    return model.pos_embed.detach().clone(), grid, nn.Sequential(*model.blocks[:depth])


class LGFFP(nn.Module):
    """Fuse three CNN layers into tokens and let CaiT blocks mix them.

    Args:
        shallow_channels, middle_channels, deep_channels: widths of the three backbone layers.
        cait_backbone: timm CaiT name; its width must be ``shallow_channels + middle_channels``.
        cait_blocks: number of leading CaiT blocks to run (paper: 11).
        pre_trained: load the CaiT's ImageNet weights through timm.
        cait_weights_path: local CaiT ``state_dict`` for offline sites.
        generator: draws the deep-layer channel selection.
    """

    def __init__(
        self,
        shallow_channels: int,
        middle_channels: int,
        deep_channels: int,
        cait_backbone: str,
        cait_blocks: int,
        pre_trained: bool,
        cait_weights_path: str | None,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        width = shallow_channels + middle_channels
        if deep_channels < width:
            msg = (
                f"LGFFP selects {width} of the deep layer's channels, but it has only {deep_channels}; "
                "use a backbone whose third layer is at least as wide as its first two together."
            )
            raise ValueError(msg)
        pos_embed, self.pos_grid, self.blocks = create_cait_blocks(
            cait_backbone, width, cait_blocks, pre_trained, cait_weights_path
        )
        self.blocks.requires_grad_(False)
        self.register_buffer("pos_embed", pos_embed)
        self.register_buffer("deep_channel_index", torch.randperm(deep_channels, generator=generator)[:width])
        self.width = width

    def fuse(self, shallow: Tensor, middle: Tensor, deep: Tensor, grid: tuple[int, int] | torch.Size) -> Tensor:
        """``[shallow, middle] + deep[selected channels]``, all resized to ``grid``: ``(B, width, *grid)``."""
        local = torch.cat([resize_to(shallow, grid), resize_to(middle, grid)], dim=1)
        return local + resize_to(deep.index_select(1, self.deep_channel_index), grid)

    def forward(self, shallow: Tensor, middle: Tensor, deep: Tensor, grid: tuple[int, int] | torch.Size) -> Tensor:
        """Fused features through the CaiT blocks, ``(B, width, *grid)``."""
        fused = self.fuse(shallow, middle, deep, grid)
        batch, channels, height, width = fused.shape
        tokens = fused.flatten(2).transpose(1, 2)
        # antialias off: the plain bicubic resize exports to ONNX/OpenVINO
        position = resample_abs_pos_embed(
            self.pos_embed, [height, width], old_size=list(self.pos_grid), num_prefix_tokens=0, antialias=False
        )
        tokens = self.blocks(tokens + position)
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)
