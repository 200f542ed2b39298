"""Embedded demo data: a small MVTec-AD-layout dataset built from scikit-image's texture photos.

``EMBEDDED_ROOT`` is the dataset root to give anomalib's ``MVTecAD`` datamodule
(``MVTecAD(root=EMBEDDED_ROOT, category="brick")``); :func:`embedded_datamodule` does that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

EMBEDDED_ROOT: Path = Path(__file__).parent / "mvtec_mini"
EMBEDDED_CATEGORIES: tuple[str, ...] = ("brick", "grass")


def embedded_datamodule(category: str = "brick", **kwargs: Any) -> Any:  # noqa: ANN401
    """anomalib's ``MVTecAD`` datamodule over the embedded data; kwargs go to ``MVTecAD``."""
    from anomalib.data import MVTecAD

    if category not in EMBEDDED_CATEGORIES:
        msg = f"category={category!r} is not embedded; choose one of {EMBEDDED_CATEGORIES}."
        raise ValueError(msg)
    kwargs.setdefault("num_workers", 0)
    return MVTecAD(root=EMBEDDED_ROOT, category=category, **kwargs)


__all__ = ["EMBEDDED_CATEGORIES", "EMBEDDED_ROOT", "embedded_datamodule"]
