"""anomalib-mlff: MLFF, MFFA and F2PAD for anomalib.

Importing this package is cheap (it runs at every Python start-up through the installed
``anomalib_mlff.pth``): it only arranges for the models to be registered with anomalib once
``anomalib.models`` is loaded (see :mod:`anomalib_mlff.registry`). The public classes load on
first access, so ``from anomalib_mlff import MLFF`` imports anomalib and torch then.
"""

from __future__ import annotations

from anomalib_mlff import _autoload

TYPE_CHECKING = False  # avoids importing `typing` at interpreter start-up
if TYPE_CHECKING:
    from anomalib_mlff.models.mlff import MLFF
    from anomalib_mlff.models.mffa import MFFA
    from anomalib_mlff.components.coreset import greedy_coreset
    from anomalib_mlff.components.memory_bank import FaissMemoryBank
    from anomalib_mlff.models.faiss_patchcore import FaissPatchcore
    from anomalib_mlff.post_processing.f2pad import F2PAD, Dice, F2PADSettings, IoU, register_scorer

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC: dict[str, str] = {
    "MLFF": "anomalib_mlff.models.mlff",
    "MFFA": "anomalib_mlff.models.mffa",
    "FaissPatchcore": "anomalib_mlff.models.faiss_patchcore",
    "FaissMemoryBank": "anomalib_mlff.components.memory_bank",
    "greedy_coreset": "anomalib_mlff.components.coreset",
    "F2PAD": "anomalib_mlff.post_processing.f2pad",
    "IoU": "anomalib_mlff.post_processing.f2pad",
    "Dice": "anomalib_mlff.post_processing.f2pad",
    "F2PADSettings": "anomalib_mlff.post_processing.f2pad",
    "register_scorer": "anomalib_mlff.post_processing.f2pad",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> object:
    """Load a public class on first access."""
    if name in _PUBLIC:
        from importlib import import_module

        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    msg = f"module 'anomalib_mlff' has no attribute {name!r}"
    raise AttributeError(msg)


_autoload.install()
