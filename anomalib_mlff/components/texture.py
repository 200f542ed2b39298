"""Statistical texture learning (STLNet, Zhu et al. CVPR 2021) as used by MLFF's texture branch.

- :func:`quantise` — 1-D quantisation of per-pixel similarities into ``N`` levels.
- :class:`TextureEnhancement` (TEM) — 1-D quantisation & counting, attention over the levels,
  level features spread back to the pixels.
- :class:`PyramidTextureExtraction` (PTFEM) — 2-D quantisation & counting (co-occurrence of the
  levels of neighbouring pixels) on ``s x s`` sub-regions for several scales ``s``.

Everything is written with fixed-shape tensor ops (min/max, floor, compare, multiply, bmm,
softmax), no data-dependent Python branches, so the modules trace and export to ONNX/OpenVINO.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

__all__ = [
    "CooccurrenceDescriptor",
    "PyramidTextureExtraction",
    "Quantisation",
    "TextureEnhancement",
    "cosine_to_mean",
    "quantise",
]

#: Added to the similarity range so a constant map (max == min) quantises without 0/0.
RANGE_EPS = 1e-6


class Quantisation(NamedTuple):
    """Result of :func:`quantise` for ``B`` maps of ``K`` pixels and ``N`` levels."""

    levels: Tensor  # (B, N) level values L_n in similarity units
    encoding: Tensor  # (B, N, K) E_{n,i} = 1 - |L_n - S_i| on the pixel's own level, else 0
    histogram: Tensor  # (B, N) sum_i E_{n,i} / sum_{n,i} E_{n,i}


def cosine_to_mean(features: Tensor) -> Tensor:
    """``(B, C, *spatial)`` -> ``(B, K)`` cosine similarity of each pixel to the map's mean feature."""
    flat = features.flatten(2)
    mean = flat.mean(dim=2, keepdim=True)
    return (F.normalize(flat, dim=1) * F.normalize(mean, dim=1)).sum(dim=1)


def quantise(similarity: Tensor, num_levels: int) -> Quantisation:
    """Quantise ``(B, K)`` values into ``num_levels`` equal bins spanning each row's [min, max].

    Level ``n`` (0-based) sits at ``min + (2n+1)/(2N) * (max - min)``; each pixel is encoded on the
    one level whose bin contains it (``|L_n - S_i| <= half a bin``) with weight ``1 - |L_n - S_i|``.
    Bins come from ``floor`` rather than the paper's two-sided window so that exactly one level
    holds every pixel, including the row's minimum and values on bin edges.
    """
    low = similarity.amin(dim=1, keepdim=True)
    span = similarity.amax(dim=1, keepdim=True) - low
    position = (similarity - low) / (span + RANGE_EPS)  # in [0, 1)
    steps = torch.arange(num_levels, device=similarity.device, dtype=similarity.dtype)
    levels = low + (2 * steps + 1) / (2 * num_levels) * span  # (B, N)
    bins = torch.floor(position * num_levels).clamp(0, num_levels - 1)  # (B, K)
    on_level = (bins.unsqueeze(1) == steps.view(1, -1, 1)).to(similarity.dtype)  # (B, N, K)
    encoding = on_level * (1 - (levels.unsqueeze(2) - similarity.unsqueeze(1)).abs())
    counts = encoding.sum(dim=2)
    histogram = counts / counts.sum(dim=1, keepdim=True).clamp_min(RANGE_EPS)
    return Quantisation(levels, encoding, histogram)


def _pointwise_mlp(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 1x1 Conv1d layers with LeakyReLU: lifts per-level (or per-pair) statistics to channels."""
    return nn.Sequential(
        nn.Conv1d(in_channels, out_channels, 1),
        nn.LeakyReLU(inplace=True),
        nn.Conv1d(out_channels, out_channels, 1),
        nn.LeakyReLU(inplace=True),
    )


class LevelAttention(nn.Module):
    """Scaled dot-product self-attention over the ``N`` level features (STLNet's graph reconstruction)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, channels)
        self.scale = channels**-0.5

    def forward(self, levels: Tensor) -> Tensor:
        """``(B, C, N)`` -> ``(B, C, N)``: each level's feature rebuilt from all levels."""
        tokens = levels.transpose(1, 2)  # (B, N, C)
        weights = torch.softmax(self.query(tokens) @ self.key(tokens).transpose(1, 2) * self.scale, dim=-1)
        return self.out(weights @ self.value(tokens)).transpose(1, 2)


class TextureEnhancement(nn.Module):
    """TEM: first-order texture features from 1-D quantisation and counting.

    Per image: cosine similarity of every pixel to the mean feature -> ``levels`` bins ->
    counting map ``B = [L; histogram]`` (2 x N) -> MLP to ``D`` (C x N), fused with the global
    feature -> attention over the levels ``D'`` -> ``R = D' E`` spreads level features back to the
    pixels. Output has the input's shape.
    """

    def __init__(self, channels: int, levels: int = 128) -> None:
        super().__init__()
        if levels < 1:
            msg = f"levels must be >= 1, got levels={levels}."
            raise ValueError(msg)
        self.levels = levels
        self.level_mlp = _pointwise_mlp(2, channels)
        self.global_fusion = _pointwise_mlp(2 * channels, channels)
        self.attention = LevelAttention(channels)

    def forward(self, features: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)`` texture features."""
        quant = quantise(cosine_to_mean(features), self.levels)
        counting = torch.stack([quant.levels, quant.histogram], dim=1)  # (B, 2, N)
        level_features = self.level_mlp(counting)  # (B, C, N)
        global_feature = features.mean(dim=(2, 3)).unsqueeze(2).expand_as(level_features)
        level_features = self.global_fusion(torch.cat([level_features, global_feature], dim=1))
        level_features = self.attention(level_features)
        return (level_features @ quant.encoding).view_as(features)  # R = D' E


class CooccurrenceDescriptor(nn.Module):
    """2-D quantisation & counting: one texture vector per region from level co-occurrences.

    Pixels of each region are quantised (cosine to the region mean, ``levels`` bins); the
    co-occurrence matrix counts level pairs of horizontally and vertically adjacent pixels
    (normalised to sum 1). Every level pair ``(L_n, L_m, C_nm)`` is lifted to ``C`` channels,
    fused with the region's mean feature, and the pairs are averaged.
    """

    def __init__(self, channels: int, levels: int = 8) -> None:
        super().__init__()
        if levels < 1:
            msg = f"levels must be >= 1, got levels={levels}."
            raise ValueError(msg)
        self.levels = levels
        self.pair_mlp = _pointwise_mlp(3, channels)
        self.region_fusion = _pointwise_mlp(2 * channels, channels)

    @staticmethod
    def cooccurrence(encoding: Tensor) -> Tensor:
        """``(R, N, h, w)`` level encodings -> ``(R, N, N)`` neighbour co-occurrences summing to 1."""
        horizontal = encoding[..., :, :-1].flatten(2) @ encoding[..., :, 1:].flatten(2).transpose(1, 2)
        vertical = encoding[..., :-1, :].flatten(2) @ encoding[..., 1:, :].flatten(2).transpose(1, 2)
        counts = horizontal + vertical
        return counts / counts.sum(dim=(1, 2), keepdim=True).clamp_min(RANGE_EPS)

    def forward(self, regions: Tensor) -> Tensor:
        """``(R, C, h, w)`` regions -> ``(R, C)`` texture descriptors."""
        n_regions, _, height, width = regions.shape
        quant = quantise(cosine_to_mean(regions), self.levels)
        pairs = self.cooccurrence(quant.encoding.view(n_regions, self.levels, height, width))
        first = quant.levels.unsqueeze(2).expand_as(pairs)
        second = quant.levels.unsqueeze(1).expand_as(pairs)
        pair_stats = torch.stack([first, second, pairs], dim=1).flatten(2)  # (R, 3, N*N)
        pair_features = self.pair_mlp(pair_stats)
        region_mean = regions.mean(dim=(2, 3)).unsqueeze(2).expand_as(pair_features)
        return self.region_fusion(torch.cat([pair_features, region_mean], dim=1)).mean(dim=2)


def split_regions(features: Tensor, grid: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B * grid * grid, C, H/grid, W/grid)``, row-major over the grid."""
    batch, channels, height, width = features.shape
    if height % grid or width % grid:
        msg = f"feature map {height}x{width} cannot be split into {grid}x{grid} equal regions (ptfem_scales)."
        raise ValueError(msg)
    regions = features.reshape(batch, channels, grid, height // grid, grid, width // grid)
    return regions.permute(0, 2, 4, 1, 3, 5).reshape(batch * grid * grid, channels, height // grid, width // grid)


class PyramidTextureExtraction(nn.Module):
    """PTFEM: multi-scale texture features from 2-D quantisation & counting.

    For each scale ``s`` the map is split into ``s x s`` regions, each region gets one
    co-occurrence descriptor, and the ``s x s`` grid is bilinearly upsampled to the input size.
    The branches are concatenated and fused by a 1x1 Conv-BN-ReLU back to ``channels``.
    The input's height and width must be divisible by every scale.
    """

    def __init__(self, channels: int, levels: int = 8, scales: Sequence[int] = (1, 2, 4, 8)) -> None:
        super().__init__()
        scales = tuple(int(scale) for scale in scales)
        if not scales or min(scales) < 1:
            msg = f"scales must be a non-empty sequence of positive integers, got scales={scales}."
            raise ValueError(msg)
        self.scales = scales
        self.branches = nn.ModuleList(CooccurrenceDescriptor(channels, levels) for _ in scales)
        self.fusion = nn.Sequential(
            nn.Conv2d(len(scales) * channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, features: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)`` multi-scale texture features."""
        batch, channels, height, width = features.shape
        outputs = []
        for scale, branch in zip(self.scales, self.branches, strict=True):
            descriptors = branch(split_regions(features, scale))  # (B*s*s, C)
            grid = descriptors.view(batch, scale, scale, channels).permute(0, 3, 1, 2)
            outputs.append(F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False))
        return self.fusion(torch.cat(outputs, dim=1))
