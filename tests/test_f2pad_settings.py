"""F2PAD's one settings object: the flat arguments build it, the checkpoint keeps it whole."""

from __future__ import annotations

import inspect
import io
from dataclasses import fields, replace
from typing import Any

import pytest
import torch
from anomalib.models import Patchcore

from anomalib_mlff import F2PAD
from anomalib_mlff.post_processing.f2pad import F2PADSettings

SETTINGS = fields(F2PADSettings)
LAST = SETTINGS[-1]


#: A valid value for the settings whose default is ``None`` and which take no share in [0, 1].
NONE_DEFAULT_EXAMPLES = {"images_per_solve": 4}


def changed(value: Any, name: str = "") -> Any:  # noqa: ANN401
    """A valid value other than ``value`` (the default of setting ``name``), by its type."""
    if value is None:
        return NONE_DEFAULT_EXAMPLES.get(name, 0.25)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 2  # keeps odd sizes odd
    if isinstance(value, float):
        return value * 2 + 0.5
    if isinstance(value, tuple):
        return ("mask",)
    raise TypeError(value)


def non_default_settings() -> dict[str, Any]:
    return {field.name: changed(field.default, field.name) for field in SETTINGS}


@pytest.mark.parametrize("field", SETTINGS, ids=[field.name for field in SETTINGS])
def test_every_setting_is_a_flat_argument_with_its_one_default(field) -> None:  # noqa: ANN001
    """What makes adding a setting one edit: the signature, attribute and CLI come from the dataclass field."""
    parameter = inspect.signature(F2PAD).parameters[field.name]
    assert parameter.default == field.default
    assert getattr(F2PAD(), field.name) == field.default
    value = changed(field.default, field.name)
    f2pad = F2PAD(**{field.name: value})
    assert getattr(f2pad.settings, field.name) == value
    assert getattr(f2pad, field.name) == value


def test_settings_survive_a_checkpoint_round_trip_including_the_last_added() -> None:
    model = Patchcore(backbone="resnet18", pre_trained=False, post_processor=F2PAD(**non_default_settings()))
    checkpoint: dict[str, Any] = {}
    model.on_save_checkpoint(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain data only

    restored = Patchcore(backbone="resnet18", pre_trained=False, post_processor=F2PAD())
    assert restored.post_processor.settings == F2PADSettings()
    restored.on_load_checkpoint(saved)
    assert restored.post_processor.settings == model.post_processor.settings
    assert getattr(restored.post_processor, LAST.name) == changed(LAST.default, LAST.name) != LAST.default


def test_a_checkpoint_that_predates_a_setting_gives_it_its_default() -> None:
    config = F2PADSettings(**non_default_settings()).to_config()
    del config[LAST.name]
    config["a_setting_since_removed"] = 1
    restored = F2PADSettings.from_config(config)
    assert getattr(restored, LAST.name) == LAST.default
    assert restored == replace(F2PADSettings(**non_default_settings()), **{LAST.name: LAST.default})


def test_checkpoints_from_before_the_settings_object_still_load() -> None:
    """They saved each setting as a flat key beside PostProcessor's own."""
    f2pad = F2PAD()
    flat = {**f2pad.checkpoint_config(), **non_default_settings()}
    del flat["settings"]
    f2pad.load_checkpoint_config(flat)
    assert f2pad.settings == F2PADSettings(**non_default_settings())


def test_assigning_a_setting_validates_and_replaces_the_whole_object() -> None:
    f2pad = F2PAD()
    before = f2pad.settings
    f2pad.dilation = 5
    assert f2pad.settings.dilation == 5 and before.dilation == F2PADSettings().dilation
    with pytest.raises(ValueError, match="median_size"):
        f2pad.median_size = 4
    with pytest.raises(ValueError, match="starts"):
        F2PAD(starts=("nowhere",))


def test_a_settings_object_is_the_base_and_keywords_override_it() -> None:
    base = F2PADSettings(dilation=3, max_iterations=20)
    f2pad = F2PAD(settings=base, max_iterations=7, enable_thresholding=False)
    assert f2pad.settings == replace(base, max_iterations=7)
    assert base.max_iterations == 20  # the object passed in is left as it was
    assert not f2pad.enable_thresholding  # PostProcessor's own arguments still reach it
    with pytest.raises(ValueError, match="median_size"):
        F2PAD(settings=base, median_size=4)
