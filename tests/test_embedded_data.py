"""The embedded demo dataset is MVTec-AD shaped, readable by anomalib, and reproducible."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from anomalib.data import MVTecAD

from anomalib_mlff.data import EMBEDDED_CATEGORIES, EMBEDDED_ROOT, embedded_datamodule
from anomalib_mlff.data.build import SplitSizes, build_category


@pytest.mark.parametrize("category", EMBEDDED_CATEGORIES)
def test_anomalib_mvtec_datamodule_reads_it(category: str) -> None:
    datamodule = MVTecAD(root=EMBEDDED_ROOT, category=category, num_workers=0, train_batch_size=8, eval_batch_size=8)
    datamodule.setup()
    sizes = SplitSizes()
    assert len(datamodule.train_data) == sizes.train_good
    test = datamodule.test_data
    labels = [int(test[i].gt_label) for i in range(len(test))]
    assert labels.count(0) == sizes.test_good
    assert labels.count(1) == 3 * sizes.per_defect
    for i in range(len(test)):
        item = test[i]
        if int(item.gt_label) == 1:
            assert item.gt_mask.sum() > 0, item.image_path
        else:
            assert item.gt_mask.sum() == 0, item.image_path


def test_masks_are_binary_and_local() -> None:
    """Masks are 0/255 and mark a small defect, not the whole image."""
    folder = EMBEDDED_ROOT / "brick"
    for defect in ("scratch", "hole"):
        for image_path in sorted((folder / "test" / defect).glob("*.png")):
            mask_path = folder / "ground_truth" / defect / f"{image_path.stem}_mask.png"
            mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
            assert set(np.unique(mask)) <= {0, 255}
            assert 0 < (mask > 0).mean() < 0.25, image_path


def test_rebuild_reproduces_shipped_files(tmp_path: Path) -> None:
    built = build_category(tmp_path, "brick")
    shipped = EMBEDDED_ROOT / "brick"
    shipped_files = sorted(p.relative_to(shipped) for p in shipped.rglob("*.png"))
    assert shipped_files == sorted(p.relative_to(built) for p in built.rglob("*.png"))
    for relative in shipped_files[::7]:
        np.testing.assert_array_equal(
            cv2.imread(str(shipped / relative), cv2.IMREAD_UNCHANGED),
            cv2.imread(str(built / relative), cv2.IMREAD_UNCHANGED),
        )


def test_embedded_datamodule_rejects_unknown_category() -> None:
    with pytest.raises(ValueError, match="category='bottle'"):
        embedded_datamodule("bottle")
