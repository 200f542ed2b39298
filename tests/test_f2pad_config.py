"""F2PAD configuration: the shipped YAML builds it through anomalib's CLI; the missing-threshold warning."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from anomalib.cli import AnomalibCLI
from anomalib.models import Patchcore

from anomalib_mlff import F2PAD, Dice, IoU
from anomalib_mlff.data import EMBEDDED_ROOT
from tests.conftest import REPO_ROOT

CONFIG = REPO_ROOT / "configs" / "f2pad_patchcore.yaml"


def test_shipped_yaml_builds_patchcore_with_f2pad(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)  # the config's data root is relative to the repository root
    cli = AnomalibCLI(["train", "--config", str(CONFIG), "--default_root_dir", str(tmp_path)], run=False)
    model = cli.model
    assert isinstance(model, Patchcore)
    post_processor = model.post_processor
    assert isinstance(post_processor, F2PAD)
    written = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["post_processor"]["init_args"]
    for name, value in written.items():
        built = post_processor.inpainter.method if name == "inpainter" else getattr(post_processor, name)
        assert built == value, name
    # the written values are F2PAD's defaults
    default = F2PAD()
    for name, value in written.items():
        assert (default.inpainter.method if name == "inpainter" else getattr(default, name)) == value, name
    metrics = {(type(metric), metric.name, tuple(metric.fields)) for metric in model.evaluator.test_metrics}
    assert (IoU, "f2pad_IoU", ("pred_mask", "gt_mask")) in metrics
    assert (Dice, "backbone_Dice", ("initial_mask", "gt_mask")) in metrics
    assert Path(cli.datamodule.root).resolve() == EMBEDDED_ROOT.resolve()


def test_missing_pixel_threshold_is_named_once(caplog: pytest.LogCaptureFixture) -> None:
    f2pad = F2PAD()
    batch = SimpleNamespace(pred_mask=torch.zeros(1, 8, 8, dtype=torch.bool))
    with caplog.at_level(logging.WARNING, logger="anomalib_mlff"):
        for _ in range(2):
            f2pad._initial_masks(batch, torch.zeros(1, 1, 8, 8), torch.Size((8, 8)))  # noqa: SLF001
    warnings = [record for record in caplog.records if "no pixel threshold" in record.getMessage()]
    assert len(warnings) == 1
    assert "0.5 on the un-normalised anomaly map" in warnings[0].getMessage()

    caplog.clear()
    validated = F2PAD()
    validated._pixel_threshold.fill_(0.3)  # noqa: SLF001 - what validation sets
    with caplog.at_level(logging.WARNING, logger="anomalib_mlff"):
        validated._initial_masks(batch, torch.zeros(1, 1, 8, 8), torch.Size((8, 8)))  # noqa: SLF001
    assert not caplog.records
