"""MFFA network (CaiT-guided feature fusion with compensated NNS and Gaussian maps).

One CNN backbone (paper: WideResNet-50, layers 1-3), fine-tuned by PSG, feeds two branches:

- NNS (:class:`NNSBranch`): pooled layer2 + layer3 patches, nearest memory-bank entry distance;
- Gaussian (:class:`GaussianBranch`): LGFFP tokens (layers 1-3 fused, CaiT blocks) or, without
  LGFFP, PaDiM's concatenation of layers 1-3, at the ``grid_layer`` resolution; randomly selected
  dimensions; per-position Mahalanobis distance.

AMC (:class:`AnomalyMapGenerator`) multiplies the image-size branch maps and smooths the product.
Training mode returns PSG's class logits; eval mode returns anomalib's ``InferenceBatch`` with
the final map and the image score = the map's maximum. Random selections are buffers drawn
from ``seed``; fitted state (memory bank, Gaussians) lives in buffers too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from torch import Tensor, nn

from anomalib_mlff.components.backbone import build_feature_extractor
from anomalib_mlff.components.streaming_coreset import DEFAULT_MEMORY_BUDGET_MB
from anomalib_mlff.components.model_checks import capturing_graph, check_backbone_layers

from .anomaly_map import AnomalyMapGenerator
from .gaussian import GaussianBranch
from .lgffp import LGFFP, resize_to
from .nns import NNSBranch
from .psg import PSGHead

__all__ = ["MFFAEmbeddings", "MFFAModel"]


class MFFAEmbeddings(NamedTuple):
    """What the branches score; ``None`` for a branch that is switched off."""

    nns: Tensor | None  # (B, C_middle + C_deep, h_middle, w_middle)
    gaussian: Tensor | None  # (B, n_gaussian_features, h_grid, w_grid): selected dimensions only


class MFFAModel(nn.Module):
    """MFFA's maths: backbone, PSG head, NNS and Gaussian branches, AMC.

    Args:
        backbone: timm CNN name. Paper: ``"wide_resnet50_2"``.
        layers: shallow, middle and deep stage names. Paper: layers 1-3.
        pre_trained: start the backbone and the CaiT from ImageNet weights (timm download).
        weights_path: local backbone ``state_dict`` for offline sites.
        cait_backbone: timm CaiT as wide as the first two layers together (768 for WideResNet-50:
            ``cait_m36_384``, ``cait_m48_448``; 192 for ResNet-18: ``cait_xxs24_224``, ...).
        cait_blocks: leading CaiT blocks LGFFP runs (paper: 11).
        cait_weights_path: local CaiT ``state_dict`` for offline sites.
        use_nns, use_gaussian: branches (paper Table 1: NNS only, Gaussian only, both = AMC).
        use_lgffp: Gaussian branch on LGFFP tokens, else on PaDiM's layer concatenation (Table 2).
        use_psg: add the PSG classifier and let the backbone train (Table 2).
        coreset_ratio: memory-bank share of the training patches (paper: 0.01).
        n_gaussian_features: randomly selected Gaussian dimensions (paper: 570).
        grid_layer: layer whose resolution LGFFP and the Gaussians use (``layers[0]``: the largest
            map, as PaDiM; ``layers[1]`` needs a quarter of the memory).
        blur_sigma: AMC smoothing (paper: 4 px).
        approximate_search: approximate FAISS search for the NNS branch (exact by default).
        memory_budget_mb: memory for the NNS training embeddings while the coreset is streamed
            (per DDP rank); within it the coreset is exactly the all-in-memory one.
        seed: draws the deep-channel and Gaussian-dimension selections and seeds the coreset.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        weights_path: str | None = None,
        cait_backbone: str = "cait_m36_384",
        cait_blocks: int = 11,
        cait_weights_path: str | None = None,
        use_nns: bool = True,
        use_gaussian: bool = True,
        use_lgffp: bool = True,
        use_psg: bool = True,
        coreset_ratio: float = 0.01,
        n_gaussian_features: int = 570,
        grid_layer: str = "layer1",
        blur_sigma: float = 4.0,
        approximate_search: bool = False,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
        seed: int = 0,
    ) -> None:
        super().__init__()
        layers = (layers,) if isinstance(layers, str) else tuple(layers)
        if not (use_nns or use_gaussian):
            msg = "At least one of use_nns and use_gaussian must be True."
            raise ValueError(msg)
        check_backbone_layers(backbone, layers)
        if grid_layer not in layers[:2]:
            msg = f"grid_layer must be one of the first two layers {layers[:2]}, got grid_layer={grid_layer!r}."
            raise ValueError(msg)
        self.layers = layers
        self.grid_layer = grid_layer
        self.seed = seed
        self.feature_extractor = build_feature_extractor(
            backbone, layers, pre_trained=pre_trained, weights_path=weights_path, requires_grad=use_psg
        )
        shallow, middle, deep = self.feature_extractor.out_dims
        self.min_size = 2 * max(self.feature_extractor.reductions)
        generator = torch.Generator().manual_seed(seed)

        self.psg_head = PSGHead(deep) if use_psg else None
        self.lgffp = (
            LGFFP(shallow, middle, deep, cait_backbone, cait_blocks, pre_trained, cait_weights_path, generator)
            if use_gaussian and use_lgffp
            else None
        )
        gaussian_width = self.lgffp.width if self.lgffp is not None else shallow + middle + deep
        self.gaussian = GaussianBranch(gaussian_width, n_gaussian_features, generator) if use_gaussian else None
        self.nns = NNSBranch(
            coreset_ratio, approximate=approximate_search, seed=seed, memory_budget_mb=memory_budget_mb
        ) if use_nns else None
        self.anomaly_map_generator = AnomalyMapGenerator(blur_sigma)

    # ------------------------------------------------------------------ checks
    @property
    def is_fitted(self) -> bool:
        """Whether every active branch has been fitted."""
        return all(branch.is_fitted for branch in (self.nns, self.gaussian) if branch is not None)

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            msg = f"images must be a (B, 3, H, W) tensor of RGB images, got {shape}."
            raise ValueError(msg)
        if capturing_graph():
            return
        if min(images.shape[-2:]) < self.min_size:
            size = tuple(images.shape[-2:])
            msg = f"images of size {size} are too small for MFFA: at least {self.min_size} px a side."
            raise ValueError(msg)
        if not bool(torch.isfinite(images).all()):
            msg = "images contain NaN or inf values; check the input data and pre-processing."
            raise ValueError(msg)

    def _check_fitted_grid(self, embeddings: MFFAEmbeddings) -> None:
        if capturing_graph():
            return
        if not self.is_fitted:
            msg = "MFFA is not fitted: train it first (anomalib's Engine.fit) or load a fitted checkpoint."
            raise RuntimeError(msg)
        if embeddings.gaussian is not None:
            positions = embeddings.gaussian.shape[-2] * embeddings.gaussian.shape[-1]
            if positions != self.gaussian.grid_positions:
                msg = (
                    f"The Gaussians were fitted on {self.gaussian.grid_positions} grid positions; these images give "
                    f"{tuple(embeddings.gaussian.shape[-2:])}. Use the training image size."
                )
                raise ValueError(msg)

    # ------------------------------------------------------------------ maths
    def classify(self, images: Tensor) -> Tensor:
        """PSG class logits ``(B, 3)`` (normal, CutPaste, CutPaste-Scar)."""
        if self.psg_head is None:
            msg = "This MFFA model was built with use_psg=False: it has no PSG classifier."
            raise RuntimeError(msg)
        self._check_images(images)
        return self.psg_head(self.feature_extractor(images)[self.layers[2]])

    def embed_features(self, features: dict[str, Tensor]) -> MFFAEmbeddings:
        """Branch embeddings from the backbone's feature maps."""
        shallow, middle, deep = (features[layer] for layer in self.layers)
        nns = self.nns.embed(middle, deep) if self.nns is not None else None
        gaussian = None
        if self.gaussian is not None:
            grid = features[self.grid_layer].shape[-2:]
            if self.lgffp is not None:
                embedding = self.lgffp(shallow, middle, deep, grid)
            else:
                embedding = torch.cat([resize_to(shallow, grid), resize_to(middle, grid), resize_to(deep, grid)], 1)
            gaussian = self.gaussian.select(embedding)
        return MFFAEmbeddings(nns=nns, gaussian=gaussian)

    def embed(self, images: Tensor) -> MFFAEmbeddings:
        """Branch embeddings of normalised images."""
        self._check_images(images)
        return self.embed_features(self.feature_extractor(images))

    def accumulate(self, embeddings: MFFAEmbeddings) -> None:
        """Add a batch of training embeddings to the branches' bounded-memory fit state."""
        if self.nns is not None:
            self.nns.accumulate(embeddings.nns)
        if self.gaussian is not None:
            self.gaussian.accumulate(embeddings.gaussian)

    def finish_fit(self) -> None:
        """Fill the memory bank and fit the Gaussians from everything accumulated (of all DDP ranks)."""
        if self.nns is not None:
            self.nns.finish()
        if self.gaussian is not None:
            self.gaussian.finish()

    def fit(self, embeddings: MFFAEmbeddings) -> None:
        """Fill the memory bank and fit the Gaussians from the training images' embeddings."""
        self.accumulate(embeddings)
        self.finish_fit()

    def patch_scores(self, embeddings: MFFAEmbeddings) -> list[Tensor]:
        """Each active branch's ``(B, 1, h, w)`` patch scores, NNS first."""
        self._check_fitted_grid(embeddings)
        scores = []
        if self.nns is not None:
            scores.append(self.nns(embeddings.nns))
        if self.gaussian is not None:
            scores.append(self.gaussian(embeddings.gaussian))
        return scores

    def branch_maps(self, images: Tensor) -> list[Tensor]:
        """Each active branch's map at the image size, ``(B, 1, H, W)``, NNS first (before AMC)."""
        scores = self.patch_scores(self.embed(images))
        return [self.anomaly_map_generator.upsample(score, images.shape[-2:]) for score in scores]

    def forward(self, images: Tensor) -> Tensor | InferenceBatch:
        """Training: PSG logits ``(B, 3)``. Eval: ``InferenceBatch(pred_score, anomaly_map)``."""
        if self.training:
            return self.classify(images)
        anomaly_map = self.anomaly_map_generator(self.branch_maps(images))
        return InferenceBatch(pred_score=anomaly_map.amax(dim=(1, 2, 3)), anomaly_map=anomaly_map)
