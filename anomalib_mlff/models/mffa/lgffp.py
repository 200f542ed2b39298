"""LGFFP: local-global feature fusion perception (MFFA, Fig. 3).

Shallow and middle CNN features are concatenated at one resolution (256 + 512 = 768 channels
for WideResNet-50), a random selection of as many deep-layer channels is added to them, and the
resulting tokens run through the first transformer blocks of a CaiT from timm, whose positional
embedding is resampled to the feature grid. The CaiT is used as is (frozen, same weights and
state-dict keys); only its talking-heads attention runs through :class:`BlockedTalkingHeadsAttention`,
which computes the same function in cache-sized blocks of query rows (timm's version materialises
``B x heads x N x N`` scores several times over, and LGFFP runs on the large layer1 grid, so that
dominated MFFA's inference time). The channel selection is a buffer, so it is saved with the
model and fixed by a seed.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.cait import Cait, TalkingHeadAttn
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mlff.components.backbone import BackboneWeightsError
from anomalib_mlff.components.model_checks import capturing_graph

__all__ = ["LGFFP", "BlockedTalkingHeadsAttention", "create_cait_blocks", "resize_to"]

#: Bytes of attention scores one block of query rows may hold on the CPU (about a core's cache share);
#: on accelerators blocks are only bounded for memory.
CPU_BLOCK_BYTES = 4 * 2**20
DEVICE_BLOCK_BYTES = 512 * 2**20


def resize_to(features: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize of ``(B, C, h, w)`` features to ``size`` (identity when it already matches)."""
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    return F.interpolate(features, size=tuple(size), mode="bilinear", align_corners=False)


class BlockedTalkingHeadsAttention(nn.Module):
    """CaiT's talking-heads self-attention (timm ``TalkingHeadAttn``) evaluated block by block.

    Same parameters (``qkv``, ``proj_l``, ``proj_w``, ``proj``, shared with the timm module it is
    built from, so state-dict keys and weights are unchanged) and the same function up to float32
    rounding:

    - ``proj_l`` mixes the heads' scores before the softmax; its bias adds one constant to a whole
      row of scores, which the softmax cancels, so it is left out;
    - ``proj_w`` mixes the heads' probabilities after it; its bias contributes ``b_h * sum(v_h)``,
      added once after the value product instead of to every probability;
    - the head mixing is one ``(heads x heads) @ (heads x rows*N)`` product, not a linear layer
      over a permuted copy of the scores;
    - scores are computed for one image and a block of query rows at a time (at most
      :data:`CPU_BLOCK_BYTES` on the CPU), so they stay in cache; a traced/exported graph uses one
      block for the whole batch, keeping its batch size dynamic.

    Attention dropout is not applied: LGFFP's CaiT is frozen and only run in inference.
    """

    def __init__(self, attention: TalkingHeadAttn) -> None:
        super().__init__()
        self.num_heads = attention.num_heads
        self.scale = attention.scale
        self.qkv = attention.qkv
        self.proj_l = attention.proj_l
        self.proj_w = attention.proj_w
        self.proj = attention.proj
        self.proj_drop = attention.proj_drop

    def _scores_times_values(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``mix_w(softmax(mix_l(q k^T))) v`` without the biases, for ``(b, H, rows, d)`` queries."""
        batch, heads, rows, _ = q.shape
        tokens = k.shape[2]
        scores = torch.matmul(self.proj_l.weight, (q @ k.transpose(-2, -1)).reshape(batch, heads, rows * tokens))
        probabilities = scores.view(batch, heads, rows, tokens).softmax(dim=-1)
        mixed = torch.matmul(self.proj_w.weight, probabilities.reshape(batch, heads, rows * tokens))
        return mixed.view(batch, heads, rows, tokens) @ v

    def _rows_per_block(self, tokens: Tensor) -> int:
        budget = CPU_BLOCK_BYTES if tokens.device.type == "cpu" else DEVICE_BLOCK_BYTES
        return max(1, budget // (self.num_heads * tokens.shape[1] * tokens.element_size()))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, C)`` tokens -> ``(B, N, C)``, as timm's ``TalkingHeadAttn.forward``."""
        batch, tokens, channels = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(batch, tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        if capturing_graph():
            out = self._scores_times_values(q, k, v)
        else:
            rows = self._rows_per_block(x)
            out = torch.cat(
                [
                    torch.cat([self._scores_times_values(q_image[:, :, r : r + rows], k_image, v_image)
                               for r in range(0, tokens, rows)], dim=2)
                    for q_image, k_image, v_image in zip(q.split(1), k.split(1), v.split(1), strict=True)
                ]
            )
        out = out + self.proj_w.bias.view(1, heads, 1, 1) * v.sum(dim=2, keepdim=True)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, channels)))


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
    blocks = nn.Sequential(*model.blocks[:depth])
    for block in blocks:
        if isinstance(block.attn, TalkingHeadAttn):
            block.attn = BlockedTalkingHeadsAttention(block.attn)
    return model.pos_embed.detach().clone(), grid, blocks


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
