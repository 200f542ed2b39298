"""Inference with exported models at full float precision.

OpenVINO runs CPU inference in bf16 by default on CPUs that support it, which moves anomaly maps
by ~5e-3 against torch; this project's inference and parity checks ask for f32 explicitly.
"""

from __future__ import annotations

from pathlib import Path

from anomalib.deploy import OpenVINOInferencer

OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def openvino_inferencer(path: str | Path, device: str = "CPU", config: dict | None = None) -> OpenVINOInferencer:
    """anomalib's ``OpenVINOInferencer`` compiled at f32 unless ``config`` says otherwise."""
    return OpenVINOInferencer(path=path, device=device, config={**OPENVINO_F32, **(config or {})})
