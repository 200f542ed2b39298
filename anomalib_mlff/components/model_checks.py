"""Checks the models share: whether torch is capturing a graph, and whether a backbone has the asked layers.

MLFF, MFFA and the FAISS memory bank skip value checks and FAISS calls while torch traces, scripts,
exports or compiles (those would be data-dependent control flow or untraceable); they all ask
:func:`capturing_graph`, so they agree on when that is.
"""

from __future__ import annotations

import timm
import torch


def capturing_graph() -> bool:
    """True while torch traces, scripts, exports or compiles the running code."""
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
    )


def check_backbone_layers(backbone: str, layers: tuple[str, ...]) -> None:
    """Fail with a clear ValueError before timm silently drops unknown layers."""
    if not isinstance(backbone, str) or not timm.is_model(backbone):
        msg = (
            f"backbone={backbone!r} is not a timm model name; "
            "use a CNN such as 'resnet18', 'resnet50', 'wide_resnet50_2'."
        )
        raise ValueError(msg)
    if len(layers) != 3 or len(set(layers)) != 3:
        msg = f"layers must name three distinct backbone stages (shallow, middle, deep), got layers={layers}."
        raise ValueError(msg)
    try:
        with torch.device("meta"):  # structure only: no memory, no weights
            probe = timm.create_model(backbone, pretrained=False, features_only=True, exportable=True)
        available = [info["module"] for info in probe.feature_info.info]
    except Exception as error:  # noqa: BLE001 - any timm failure means "cannot use this backbone"
        msg = f"backbone={backbone!r} cannot provide feature maps ({type(error).__name__}: {error})."
        raise ValueError(msg) from error
    unknown = [layer for layer in layers if layer not in available]
    if unknown:
        msg = f"layers={layers}: {unknown} not in backbone {backbone!r}, whose stages are {available}."
        raise ValueError(msg)
    if [available.index(layer) for layer in layers] != sorted(available.index(layer) for layer in layers):
        msg = f"layers={layers} must be ordered from shallow to deep ({available})."
        raise ValueError(msg)
