"""Start-up hook that registers this plugin's models the moment anomalib loads its model zoo.

anomalib has no plugin registry: its CLI resolves ``--model MLFF`` only among classes already
imported, and ``anomalib.models.get_model`` only among direct subclasses of ``AnomalibModule``.
The installed ``anomalib_mlff.pth`` calls :func:`install`, which puts a one-shot finder on
``sys.meta_path``. It does nothing until some program imports ``anomalib.models``; right after
that module has executed, it imports :mod:`anomalib_mlff.registry`. Programs that never import
anomalib pay for this module only (standard library, no other imports).
"""

from __future__ import annotations

import sys
import warnings

_TARGET = "anomalib.models"


class _RegisterAfterAnomalibModels:
    """Meta-path finder that wraps the loader of ``anomalib.models`` to register afterwards."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:  # noqa: ARG002
        if fullname != _TARGET:
            return None
        uninstall()
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_then_register(module: object) -> None:
            original_exec(module)
            _register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def _plugin_module_initialising() -> bool:
    """True while a module of this package is half-way through its own import.

    That happens when one of our modules is what first imports ``anomalib.models``; registering
    then would re-enter that half-initialised module. Our subpackages import ``anomalib.models``
    before any of their own modules to avoid it; this guard covers the rest, which then
    register on their own through the same registry (see ``anomalib_mlff.models``).
    """
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "anomalib_mlff" and name != "anomalib_mlff":
            spec = getattr(module, "__spec__", None)
            if spec is not None and getattr(spec, "_initializing", False):
                return True
    return False


def _register() -> None:
    if _plugin_module_initialising():
        return
    try:
        from anomalib_mlff.registry import register_models

        register_models()
    except Exception as error:  # noqa: BLE001 - a broken plugin must not break anomalib itself
        warnings.warn(
            f"anomalib-mlff could not register its models with anomalib ({type(error).__name__}: {error}); "
            "`import anomalib_mlff` shows the full error.",
            RuntimeWarning,
            stacklevel=2,
        )


def install() -> None:
    """Register now if anomalib's models are loaded, else when they are."""
    if _TARGET in sys.modules:
        _register()
        return
    if not any(isinstance(finder, _RegisterAfterAnomalibModels) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterAnomalibModels())


def uninstall() -> None:
    """Remove the finder (it is single-use)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterAnomalibModels)]
