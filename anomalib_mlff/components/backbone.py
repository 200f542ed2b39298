"""Backbone feature extraction through anomalib's ``TimmFeatureExtractor``, with offline support.

ImageNet weights come from the Hugging Face hub through timm. Air-gapped sites pass
``weights_path`` (a ``state_dict`` saved from the full timm model, ``.pth``/``.bin``/
``.safetensors``); when a download fails the error says exactly that.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.models.components import TimmFeatureExtractor


class BackboneWeightsError(RuntimeError):
    """Pretrained backbone weights could not be downloaded or loaded."""


def _read_state_dict(weights_path: Path) -> dict[str, torch.Tensor]:
    if not weights_path.is_file():
        msg = f"weights_path={str(weights_path)!r} does not exist or is not a file."
        raise BackboneWeightsError(msg)
    try:
        if weights_path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights_path))
        else:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:
        msg = f"Could not read backbone weights from weights_path={str(weights_path)!r}: {error}"
        raise BackboneWeightsError(msg) from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        msg = f"weights_path={str(weights_path)!r} holds a {type(state).__name__}, expected a state_dict."
        raise BackboneWeightsError(msg)
    return state


def load_backbone_weights(extractor: TimmFeatureExtractor, weights_path: str | Path) -> None:
    """Load a full-model timm ``state_dict`` into a ``features_only`` extractor.

    Keys of layers the extractor dropped (the classifier head, later stages) are ignored; a key
    the extractor needs but the file lacks is an error naming the file.
    """
    weights_path = Path(weights_path)
    state = _read_state_dict(weights_path)
    target = extractor.feature_extractor
    wanted = target.state_dict()
    missing = [key for key in wanted if key not in state]
    if missing:
        msg = (
            f"weights_path={str(weights_path)!r} does not fit backbone {extractor.backbone!r}: "
            f"{len(missing)} tensors missing, e.g. {missing[:3]}."
        )
        raise BackboneWeightsError(msg)
    mismatched = [k for k in wanted if state[k].shape != wanted[k].shape]
    if mismatched:
        msg = (
            f"weights_path={str(weights_path)!r}: shapes differ for {mismatched[:3]} "
            f"(backbone {extractor.backbone!r})."
        )
        raise BackboneWeightsError(msg)
    target.load_state_dict({key: state[key] for key in wanted})


def build_feature_extractor(
    backbone: str,
    layers: Sequence[str],
    pre_trained: bool = True,
    weights_path: str | Path | None = None,
    requires_grad: bool = False,
) -> TimmFeatureExtractor:
    """Create anomalib's timm feature extractor; a local ``weights_path`` replaces the download."""
    download = pre_trained and weights_path is None
    try:
        extractor = TimmFeatureExtractor(
            backbone=backbone,
            layers=list(layers),
            pre_trained=download,
            requires_grad=requires_grad,
        )
    except OSError as error:
        msg = (
            f"Could not download ImageNet weights for backbone {backbone!r} ({type(error).__name__}). "
            "Offline, pass weights_path=<file with the timm model's state_dict> "
            "(CLI: --model.weights_path PATH), or pre_trained=False for a randomly initialised backbone."
        )
        raise BackboneWeightsError(msg) from error
    if weights_path is not None:
        load_backbone_weights(extractor, weights_path)
    return extractor
