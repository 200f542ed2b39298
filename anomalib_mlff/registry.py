"""The one place that registers this plugin's models with anomalib.

After :func:`register_models`, each model class is an attribute of ``anomalib.models`` (so
``get_model({"class_path": "MLFF"})`` works) and, being imported, a subclass that anomalib's CLI
resolves by its short name (``anomalib train --model MLFF``). ``get_model("mlff")`` and ``list_models()``
work because each model derives directly from ``AnomalibModule`` (``FaissPatchcore`` names it again
beside ``Patchcore``).
"""

from __future__ import annotations

from importlib import import_module

# (module, class name) of every model this plugin adds to anomalib.
MODELS: tuple[tuple[str, str], ...] = (
    ("anomalib_mlff.models.mlff", "MLFF"),
    ("anomalib_mlff.models.mffa", "MFFA"),
    ("anomalib_mlff.models.faiss_patchcore", "FaissPatchcore"),
)


def register_models() -> list[str]:
    """Import every model and expose it on ``anomalib.models``; returns the registered names."""
    import anomalib.models as anomalib_models

    names = []
    for module_name, class_name in MODELS:
        model_class = getattr(import_module(module_name), class_name)
        setattr(anomalib_models, class_name, model_class)
        if class_name not in anomalib_models.__all__:
            anomalib_models.__all__.append(class_name)
        names.append(class_name)
    return names
