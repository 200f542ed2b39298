"""Runs of anomalib's own pipelines over this plugin's models."""

