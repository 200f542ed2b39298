"""F2PAD's paper mode: one preset that differs from the defaults exactly in the paper's choices, reachable from
Python, YAML and the CLI; and the two paper choices with a setting of their own (the stopping rule, the unscaled
feature term)."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from anomalib.cli import AnomalibCLI

from anomalib_mlff import F2PAD
from anomalib_mlff.post_processing.f2pad import ClassicalInpainter, F2PADSettings, refine
from anomalib_mlff.post_processing.f2pad.optimizer import OptimizerSettings, minimise
from anomalib_mlff.post_processing.f2pad.scorers import build_scorer
from tests.conftest import REPO_ROOT
from tests.f2pad_fixtures import IMAGENET, defect_image, patchcore

CONFIG = REPO_ROOT / "configs" / "f2pad_paper.yaml"

#: The paper's procedure where the defaults depart from it, written out independently of settings.PAPER.
PAPER = {
    "starts": ("mask",),
    "stop_on_raw_change": True,
    "max_iterations": 1200,
    "reestimation_iterations": 1200,
    "median_size": 1,
    "colour_growth": None,
    "min_explained": 0.0,
    "max_unexplained_area": None,
    "mask_patience": None,
    "scale_feature_term": False,
}


def differences(settings: F2PADSettings) -> dict[str, object]:
    """The fields in which ``settings`` differs from the defaults, with its values."""
    defaults = F2PADSettings()
    return {f.name: getattr(settings, f.name) for f in fields(F2PADSettings)
            if getattr(settings, f.name) != getattr(defaults, f.name)}


def test_the_paper_preset_differs_from_the_defaults_in_exactly_the_listed_fields() -> None:
    assert differences(F2PADSettings.paper()) == PAPER
    assert F2PADSettings.from_preset("paper") == F2PADSettings.paper()
    assert F2PADSettings.from_preset(None) == F2PADSettings()


def test_f2pad_preset_paper_gives_those_settings_and_explicit_arguments_override_it() -> None:
    assert F2PAD(preset="paper").settings == F2PADSettings.paper()
    assert F2PAD().settings == F2PADSettings()
    mixed = F2PAD(preset="paper", max_iterations=300, dilation=4)
    assert mixed.settings == F2PADSettings.paper(max_iterations=300, dilation=4)
    # the CLI passes every argument at its default: those do not undo the preset
    defaults = {f.name: f.default for f in fields(F2PADSettings)}
    assert F2PAD(preset="paper", **defaults).settings == F2PADSettings.paper()
    with pytest.raises(ValueError, match="preset"):
        F2PAD(preset="published")


def test_shipped_paper_yaml_builds_f2pad_in_paper_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)  # the config's data root is relative to the repository root
    cli = AnomalibCLI(["train", "--config", str(CONFIG), "--default_root_dir", str(tmp_path)], run=False)
    post_processor = cli.model.post_processor
    assert isinstance(post_processor, F2PAD)
    assert post_processor.settings == F2PADSettings.paper()
    assert differences(post_processor.settings) == PAPER
    override = ["--model.post_processor.init_args.max_iterations", "300"]
    cli = AnomalibCLI(["train", "--config", str(CONFIG), "--default_root_dir", str(tmp_path), *override], run=False)
    assert cli.model.post_processor.settings == F2PADSettings.paper(max_iterations=300)


def test_the_raw_change_rule_stops_at_the_first_small_decrease_and_the_default_rule_waits() -> None:
    """J = sum (x - 0.2)^2 over 64 pixels from 0.9: Adan's first steps lower it by about 0.5 each, then by less."""
    observed = torch.full((1, 1, 8, 8), 0.9)
    region = torch.ones(1, 8, 8, dtype=torch.bool)

    def objective(x: torch.Tensor) -> torch.Tensor:
        return (x - 0.2).square().flatten(1).sum(1)

    base = OptimizerSettings.of(F2PADSettings(max_iterations=200, tolerance=0.3), default_tolerance=0.3)
    assert OptimizerSettings.of(F2PADSettings.paper(), default_tolerance=0.3).raw_change  # the preset reaches the solver
    _, raw = minimise(objective, observed, observed, region, replace(base, raw_change=True), share=False)
    _, smoothed = minimise(objective, observed, observed, region, base, share=False)
    values = raw.values[:, 0]
    decreases = values[:-1] - values[1:]
    stop = int(raw.iterations[0])
    assert 1 < stop < 200
    assert decreases[stop - 1] < 0.3 <= decreases[: stop - 1].min()  # it stopped at the first small decrease
    assert stop < int(smoothed.iterations[0])


def test_the_feature_term_is_scaled_by_g0_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib_mlff.post_processing.f2pad import refinement  # noqa: PLC0415

    def refuse(*_: object) -> torch.Tensor:
        raise AssertionError("g0 computed")

    monkeypatch.setattr(refinement, "calibrate_feature_scale", refuse)
    image, truth = defect_image()
    scorer = build_scorer(patchcore(), IMAGENET, num_candidates=5)
    small = {"dilation": 3, "crop_margin": 16, "reach": 8, "max_iterations": 3, "reestimation_iterations": 2}
    result = refine(image[None], truth[None], scorer, ClassicalInpainter(), None, F2PADSettings.paper(**small))
    assert result.pred_mask.shape == truth[None].shape
    with pytest.raises(AssertionError, match="g0 computed"):
        refine(image[None], truth[None], scorer, ClassicalInpainter(), None, F2PADSettings(**small))
