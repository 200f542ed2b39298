"""This plugin's anomalib models.

``anomalib.models`` is imported first, before any model module of ours starts executing, so
that the start-up hook can register every model (see :mod:`anomalib_mlff.registry`) without
meeting one of them half-imported.
"""

import anomalib.models  # noqa: F401  (order matters: see the docstring)

from anomalib_mlff.registry import register_models

register_models()
