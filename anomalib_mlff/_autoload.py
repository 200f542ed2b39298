"""Start-up hook that registers this plugin's models the moment anomalib loads its model zoo.

anomalib has no plugin registry: its CLI resolves ``--model MLFF`` only among classes already
imported, and ``anomalib.models.get_model`` only among direct subclasses of ``AnomalibModule``.
The installed ``anomalib_mlff.pth`` calls :func:`install`, which puts a finder on ``sys.meta_path``
with two jobs, both done once ``anomalib.models`` has loaded (the finder then removes itself):

- right after ``anomalib.models`` has executed, it imports :mod:`anomalib_mlff.registry`, which
  imports and registers every model;
- the first time a subpackage of ours (``anomalib_mlff.components``, ``.post_processing``, ...) is
  imported before ``anomalib.models``, it imports ``anomalib.models`` before the subpackage's body
  runs. Registration then never meets one of our modules half-executed (a leaf module that
  imports anomalib would otherwise trigger it from inside itself), and no subpackage of ours has to
  import ``anomalib_mlff.models`` for ordering.

Programs that never import anomalib or our subpackages pay for this module only (standard library).
"""

from __future__ import annotations

import sys
import warnings

_TARGET = "anomalib.models"
_PACKAGE = "anomalib_mlff"
_preparing: set[str] = set()  # our subpackages created but waiting for anomalib.models before their body


class _RegisterWithAnomalib:
    """Meta-path finder that wraps loaders: registration after ``anomalib.models``, and that first."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:  # noqa: ARG002
        if _TARGET in sys.modules:
            uninstall()
            return None
        if fullname == _TARGET:
            return _wrapped_spec(fullname, after=_register)
        if fullname.count(".") == 1 and fullname.startswith(_PACKAGE + ".") and fullname != f"{_PACKAGE}.registry":
            return _wrapped_spec(fullname, before=_import_anomalib_models)
        return None


def _wrapped_spec(fullname: str, before: object = None, after: object = None) -> object:
    """The spec the other finders give ``fullname``, its loader running ``before`` / ``after`` its body."""
    from importlib.util import find_spec

    finder = next((f for f in sys.meta_path if isinstance(f, _RegisterWithAnomalib)), None)
    if finder is not None:
        sys.meta_path.remove(finder)  # let the other finders answer
    try:
        spec = find_spec(fullname)
    finally:
        if finder is not None and _TARGET not in sys.modules:
            sys.meta_path.insert(0, finder)
    if spec is None or spec.loader is None:
        return spec
    original_exec = spec.loader.exec_module

    def exec_module(module: object) -> None:
        if before is not None:
            before(module)
        original_exec(module)
        if after is not None:
            after()

    spec.loader.exec_module = exec_module  # type: ignore[method-assign]
    return spec


def _import_anomalib_models(module: object) -> None:
    """Load anomalib's model zoo (and so register ours) before the body of our subpackage ``module``."""
    name = module.__name__  # type: ignore[attr-defined]
    _preparing.add(name)
    try:
        import anomalib.models  # noqa: F401, PLC0415
    finally:
        _preparing.discard(name)


def _plugin_module_initialising() -> bool:
    """True while a module of this package is half-way through its own body.

    Registering then would re-enter that half-executed module. The subpackage wrapper above makes
    this the rare case (a program that imports our modules under another loader, say); those
    modules then register through the same registry once imported.
    """
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == _PACKAGE and name != _PACKAGE and name not in _preparing:
            spec = getattr(module, "__spec__", None)
            if spec is not None and getattr(spec, "_initializing", False):
                return True
    return False


def _register() -> None:
    uninstall()
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
    if not any(isinstance(finder, _RegisterWithAnomalib) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWithAnomalib())


def uninstall() -> None:
    """Remove the finder (its work is done once anomalib.models has loaded)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterWithAnomalib)]
