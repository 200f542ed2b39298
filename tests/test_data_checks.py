"""Pre-flight image check and the empty-training-set error of the memory-bank models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_mlff import FaissPatchcore
from anomalib_mlff.components.data_checks import check_image_files
from tests import lightning_helpers as helpers


def broken_copy(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A small brick copy with a truncated, an empty and a 16-bit image among its files."""
    root = helpers.small_copy(tmp_path, n_train=4)
    train = sorted((root / "train" / "good").glob("*.png"))
    data = train[0].read_bytes()
    train[0].write_bytes(data[: len(data) // 2])
    train[1].write_bytes(b"")
    good_test = sorted((root / "test" / "good").glob("*.png"))[0]
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7)).save(good_test)
    return root, {"truncated": train[0], "empty": train[1], "16-bit": good_test}


def test_every_bad_file_is_listed_by_path_before_training(tmp_path: Path) -> None:
    root, bad = broken_copy(tmp_path)
    data = helpers.datamodule(root.parent, "brick")
    data.setup()
    with pytest.raises(ValueError, match="3 of") as error:
        check_image_files(data, progress=False)
    message = str(error.value)
    for kind, path in bad.items():
        assert str(path) in message, kind
    assert "empty file" in message
    assert "truncated" in message
    assert "I;16" in message


def test_skip_bad_drops_them_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, bad = broken_copy(tmp_path)
    data = helpers.datamodule(root.parent, "brick")
    data.setup()
    test_count = len(data.test_data)
    problems = check_image_files(data, skip_bad=True, progress=False)
    assert set(problems) == {str(path) for path in bad.values()}
    assert len(data.train_data) == 2
    assert len(data.test_data) == test_count - 1
    assert str(bad["empty"]) in caplog.text
    assert check_image_files(data, progress=False) == {}


def test_faiss_patchcore_names_an_empty_training_folder(tmp_path: Path) -> None:
    root = helpers.small_copy(tmp_path, n_train=0)
    model = FaissPatchcore(backbone="resnet18", pre_trained=False, visualizer=False)
    with pytest.raises(ValueError, match=r"training set of MVTecAD\(root=.*has 0 image"):
        helpers.quiet_engine(tmp_path).fit(model, datamodule=helpers.datamodule(root.parent, "brick"))


def test_faiss_patchcore_stops_on_a_truncated_training_image_naming_it(tmp_path: Path) -> None:
    root, bad = broken_copy(tmp_path)
    model = FaissPatchcore(backbone="resnet18", pre_trained=False, visualizer=False)
    with pytest.raises(ValueError, match="cannot be read") as error:
        helpers.quiet_engine(tmp_path).fit(model, datamodule=helpers.datamodule(root.parent, "brick"))
    assert str(bad["truncated"]) in str(error.value)
