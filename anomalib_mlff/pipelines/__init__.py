"""Runs of anomalib's own pipelines over this plugin's models.

``anomalib.models`` is imported first so the models are registered before any module of ours
executes (see :mod:`anomalib_mlff.models`).
"""

import anomalib_mlff.models  # noqa: F401  (registers the models first)
