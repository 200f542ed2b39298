"""This plugin's anomalib models (MLFF, MFFA, FaissPatchcore), one subpackage each.

They are registered with anomalib by :mod:`anomalib_mlff.registry`, which the start-up hook
(:mod:`anomalib_mlff._autoload`) runs as soon as ``anomalib.models`` loads; the hook also loads
``anomalib.models`` before this package's body, so the order never depends on what is imported first.
"""
