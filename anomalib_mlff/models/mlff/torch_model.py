"""MLFF network (Tang et al., 2025): multi-level feature fusion for pixel-level anomaly scores.

Fig. 1 of the paper, on a CNN backbone's three stages (ResNet-50 layers 1-3):

- texture branch (STLNet): layer1 + upsampled layer2 -> 1x1 reduction ``low`` -> TEM;
  ``[low, TEM]`` -> PTFEM; texture features = ``[low, TEM, PTFEM]``;
- semantic branch: layer3 -> 1x1 reduction -> SCConv (pooling rate 4);
- fusion: semantic features upsampled to layer1's resolution, concatenated with the texture
  features, 1x1 Conv-BN-ReLU + 1x1 Conv -> per-pixel feature ``psi`` (``feature_dim`` channels);
- score head: 1x1 conv ``psi -> S`` (the paper's per-pixel fully connected layer).

``use_stl=False`` / ``use_scconv=False`` replace a branch by the raw backbone features (with
both off: layers 1-3 fused directly, the paper's ablation baseline). Input images are expected
ImageNet-normalised. Training mode returns :class:`MLFFOutput` (``psi`` and scores at layer1's
resolution, stride 4 for ResNets); eval mode returns anomalib's ``InferenceBatch`` with the
score map upsampled to the input size and the image score = the map's maximum (Eq. 9).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mlff.components.backbone import build_feature_extractor
from anomalib_mlff.components.model_checks import capturing_graph, check_backbone_layers
from anomalib_mlff.components.scconv import SelfCalibratedConv
from anomalib_mlff.components.texture import PyramidTextureExtraction, TextureEnhancement

from .anomaly_map import AnomalyMapGenerator, pseudo_huber_distance

__all__ = ["MLFFModel", "MLFFOutput"]

#: SCConv's pooling rate r (Liu et al. 2020; MLFF keeps the original value).
SCCONV_POOLING_RATE = 4


class MLFFOutput(NamedTuple):
    """Training-mode output at the feature resolution (layer1's, stride 4 for ResNets)."""

    features: Tensor  # (B, feature_dim, h, w): fused per-pixel features psi
    scores: Tensor | None  # (B, 1, h, w) score-head output, None without the score head


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _resize(features: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


def _require_finite(tensor: Tensor, where: str) -> None:
    if not capturing_graph() and not bool(torch.isfinite(tensor).all()):
        msg = (
            f"MLFF produced NaN/inf in {where} from finite images: the weights have diverged "
            "(lower the learning rate) or a checkpoint is corrupt."
        )
        raise FloatingPointError(msg)


class TextureBranch(nn.Module):
    """STLNet on the shallow features: ``[low, TEM(low), PTFEM(merge([low, TEM(low)]))]``."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        tem_levels: int,
        ptfem_levels: int,
        ptfem_scales: Sequence[int],
    ) -> None:
        super().__init__()
        self.reduce = _conv_bn_relu(in_channels, channels)
        self.tem = TextureEnhancement(channels, tem_levels)
        self.merge = _conv_bn_relu(2 * channels, channels)
        self.ptfem = PyramidTextureExtraction(channels, ptfem_levels, ptfem_scales)
        self.out_channels = 3 * channels

    def forward(self, shallow: Tensor) -> Tensor:
        """``(B, in_channels, h, w)`` -> ``(B, 3 * channels, h, w)``."""
        low = self.reduce(shallow)
        first_order = self.tem(low)
        multi_scale = self.ptfem(self.merge(torch.cat([low, first_order], dim=1)))
        return torch.cat([low, first_order, multi_scale], dim=1)


class MLFFModel(nn.Module):
    """Multi-level feature fusion network.

    Args:
        backbone: timm CNN name. Paper: ``"resnet50"``.
        layers: shallow, middle and deep stage names. Paper: layers 1-3.
        pre_trained: start the backbone from ImageNet weights.
        weights_path: local backbone ``state_dict`` for offline sites.
        freeze_backbone: keep the backbone fixed (the paper trains end to end).
        feature_dim: channels of ``psi`` and of every internal branch (default 256).
        use_stl, use_scconv, use_score_head: Table 4 ablation switches.
        tem_levels: TEM quantisation levels (STLNet: 128).
        ptfem_levels: levels per PTFEM branch (STLNet: 8).
        ptfem_scales: PTFEM region grids (MLFF: 1, 2, 4, 8).

    Input height and width must be multiples of :attr:`size_multiple` and at least
    :attr:`min_size` (ResNets with the defaults: multiples of 32, at least 64).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        weights_path: str | None = None,
        freeze_backbone: bool = False,
        feature_dim: int = 256,
        use_stl: bool = True,
        use_scconv: bool = True,
        use_score_head: bool = True,
        tem_levels: int = 128,
        ptfem_levels: int = 8,
        ptfem_scales: Sequence[int] = (1, 2, 4, 8),
    ) -> None:
        super().__init__()
        layers = (layers,) if isinstance(layers, str) else tuple(layers)
        ptfem_scales = tuple(ptfem_scales)
        for name, value in (("feature_dim", feature_dim), ("tem_levels", tem_levels), ("ptfem_levels", ptfem_levels)):
            if not isinstance(value, int) or value < 1:
                msg = f"{name} must be a positive integer, got {name}={value!r}."
                raise ValueError(msg)
        if not ptfem_scales or not all(isinstance(s, int) and s >= 1 for s in ptfem_scales):
            msg = f"ptfem_scales must be a non-empty sequence of positive integers, got ptfem_scales={ptfem_scales!r}."
            raise ValueError(msg)
        check_backbone_layers(backbone, layers)

        self.layers = layers
        self.feature_extractor = build_feature_extractor(
            backbone, layers, pre_trained=pre_trained, weights_path=weights_path, requires_grad=not freeze_backbone
        )
        if freeze_backbone:  # the extractor then runs in eval/no_grad; keep optimisers off it too
            self.feature_extractor.requires_grad_(False)
        reductions = getattr(self.feature_extractor, "reductions", None)
        if reductions is None:
            msg = f"backbone={backbone!r} is not a CNN with spatial feature maps; use e.g. 'resnet50'."
            raise ValueError(msg)
        shallow_channels, middle_channels, deep_channels = self.feature_extractor.out_dims
        self.size_multiple, self.min_size = self._valid_sizes(tuple(reductions), use_stl, use_scconv, ptfem_scales)

        low_level_channels = shallow_channels + middle_channels
        self.texture = (
            TextureBranch(low_level_channels, feature_dim, tem_levels, ptfem_levels, ptfem_scales) if use_stl else None
        )
        self.semantic = (
            nn.Sequential(
                _conv_bn_relu(deep_channels, feature_dim),
                SelfCalibratedConv(feature_dim, SCCONV_POOLING_RATE),
                nn.ReLU(inplace=True),
            )
            if use_scconv
            else None
        )
        texture_channels = self.texture.out_channels if self.texture is not None else low_level_channels
        semantic_channels = feature_dim if use_scconv else deep_channels
        self.fusion = nn.Sequential(
            _conv_bn_relu(texture_channels + semantic_channels, feature_dim),
            nn.Conv2d(feature_dim, feature_dim, 1),
        )
        self.score_head = nn.Conv2d(feature_dim, 1, 1) if use_score_head else None
        self.anomaly_map_generator = AnomalyMapGenerator()

    @staticmethod
    def _valid_sizes(
        reductions: tuple[int, ...],
        use_stl: bool,
        use_scconv: bool,
        ptfem_scales: tuple[int, ...],
    ) -> tuple[int, int]:
        """(multiple, minimum) image side: exact strides, PTFEM regions of >= 2x2, SCConv pooling."""
        shallow_stride, deep_stride = reductions[0], reductions[-1]
        multiple, minimum = deep_stride, deep_stride
        if use_stl:
            region = shallow_stride * max(ptfem_scales)
            multiple = math.lcm(multiple, region)
            minimum = max(minimum, 2 * region)
        if use_scconv:
            minimum = max(minimum, deep_stride * SCCONV_POOLING_RATE)
        return multiple, math.ceil(minimum / multiple) * multiple

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            msg = f"images must be a 4-D (B, 3, H, W) tensor, got {shape}."
            raise ValueError(msg)
        if images.shape[1] != 3:
            msg = f"images must have 3 channels (RGB), got images of shape {tuple(images.shape)}."
            raise ValueError(msg)
        if capturing_graph():
            return
        height, width = images.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple or min(height, width) < self.min_size:
            msg = (
                f"images of size {height}x{width} do not fit this MLFF network: height and width must be "
                f"multiples of {self.size_multiple} and at least {self.min_size} (e.g. 256x256)."
            )
            raise ValueError(msg)
        if not bool(torch.isfinite(images).all()):
            msg = "images contain NaN or inf values; check the input data and pre-processing."
            raise ValueError(msg)

    def extract_features(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Fused per-pixel features ``psi`` and scores (``None`` without the head) at layer1's resolution."""
        self._check_images(images)
        backbone_features = self.feature_extractor(images)
        shallow, middle, deep = (backbone_features[layer] for layer in self.layers)
        for layer, features in zip(self.layers, (shallow, middle, deep), strict=True):
            _require_finite(features, f"backbone features of {layer!r}")
        size = shallow.shape[-2:]
        low_level = torch.cat([shallow, _resize(middle, size)], dim=1)
        texture = self.texture(low_level) if self.texture is not None else low_level
        semantic = self.semantic(deep) if self.semantic is not None else deep
        psi = self.fusion(torch.cat([texture, _resize(semantic, size)], dim=1))
        _require_finite(psi, "the fused features psi (texture/semantic branches)")
        scores = self.score_head(psi) if self.score_head is not None else None
        return psi, scores

    def forward(self, images: Tensor) -> MLFFOutput | InferenceBatch:
        """Training: ``MLFFOutput(features, scores)``. Eval: ``InferenceBatch(pred_score, anomaly_map)``."""
        psi, scores = self.extract_features(images)
        if self.training:
            return MLFFOutput(features=psi, scores=scores)
        pixel_scores = scores if scores is not None else pseudo_huber_distance(psi)
        anomaly_map = self.anomaly_map_generator(pixel_scores, images.shape[-2:])
        return InferenceBatch(pred_score=anomaly_map.amax(dim=(1, 2, 3)), anomaly_map=anomaly_map)
