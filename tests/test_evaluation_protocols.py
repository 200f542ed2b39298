"""Defect synthesis (components/defects.py) and the evaluation protocols built from it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_mlff.components.defects import (
    DEFECTS,
    MATERIAL_DEFECTS,
    MIN_CHANGE,
    MIN_COLOUR_DISTANCE,
    flat_colour_paste,
    hole,
    material_defect,
    scratch,
    stain,
)
from anomalib_mlff.data import EMBEDDED_ROOT
from anomalib_mlff.evaluation.protocols import build_paper, build_realistic, count_defective


def _normal(category: str = "brick") -> np.ndarray:
    return np.asarray(Image.open(EMBEDDED_ROOT / category / "test" / "good" / "000.png").convert("L"))


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


@pytest.mark.parametrize("defect", [scratch, stain, lambda image, rng: hole(image, rng, _normal("grass"))])
def test_surface_defects_mask_what_they_changed(defect) -> None:  # noqa: ANN001
    """Scratch and hole change exactly their mask; the stain darkens every masked pixel."""
    gray = _normal()
    image, mask = defect(gray, np.random.default_rng(3))
    assert image.shape == gray.shape and image.dtype == np.uint8
    assert mask.any() and mask.mean() < 0.25
    if defect is stain:  # a soft edge darkens a little beyond the mask, and nothing brightens
        assert (image <= gray).all()
    else:
        assert (image[~mask] == gray[~mask]).all()
    assert (image[mask] != gray[mask]).mean() > 0.9


@pytest.mark.parametrize("kind", list(MATERIAL_DEFECTS))
def test_material_defects_change_their_mask_visibly(kind: str) -> None:
    gray = _normal()
    image, mask = material_defect(gray, kind, np.random.default_rng(5))
    assert image.shape == (*gray.shape, 3) and image.dtype == np.uint8
    change = np.abs(image.astype(int) - gray[..., None].astype(int)).max(-1)
    assert mask.any() and change[mask].mean() >= MIN_CHANGE
    again, mask_again = material_defect(gray, kind, np.random.default_rng(5))
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(mask, mask_again)


def test_material_defect_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind="):
        material_defect(_normal(), "scratch", np.random.default_rng(0))
    assert set(MATERIAL_DEFECTS) < set(DEFECTS)


def test_flat_colour_paste_is_one_distinct_colour_inside_the_mask() -> None:
    normal = np.asarray(Image.open(EMBEDDED_ROOT / "brick" / "test" / "good" / "000.png").convert("RGB")) / 255.0
    source = np.zeros(normal.shape[:2], bool)
    source[40:60, 50:90] = True
    defective, mask = flat_colour_paste(normal, source, np.random.default_rng(1))
    assert mask.any()
    np.testing.assert_array_equal(defective[~mask], normal[~mask])
    colours = np.unique(defective[mask], axis=0)
    assert len(colours) == 1
    assert np.linalg.norm(normal[mask] - colours[0], axis=1).mean() >= MIN_COLOUR_DISTANCE
    with pytest.raises(ValueError, match="mask_source"):
        flat_colour_paste(normal, np.zeros_like(source), np.random.default_rng(1))


def test_protocols_are_deterministic_with_exact_masks(tmp_path: Path) -> None:
    """Same seed, same files; another seed, other defects; masks match the images' count."""
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_paper(tmp_path / name / "paper", "brick", 3, seed)
        build_realistic(tmp_path / name / "realistic", "brick", 2, 4, seed)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert _tree(tmp_path / "a") != _tree(tmp_path / "c")
    assert count_defective(tmp_path / "a" / "paper", "brick") == 3
    assert count_defective(tmp_path / "a" / "realistic", "brick") == 6
    realistic = tmp_path / "a" / "realistic" / "brick"
    for image in (realistic / "test").glob("*/*.png"):
        mask = np.asarray(Image.open(realistic / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"))
        assert set(np.unique(mask)) <= {0, 255} and mask.any(), image
    assert len(list((realistic / "train" / "good").glob("*.png"))) == 60


def test_build_paper_names_a_source_without_images(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="source_root"):
        build_paper(tmp_path / "out", "brick", 1, 0, source_root=tmp_path / "empty")


def test_paper_protocol_holds_its_normal_images_out_of_training(tmp_path: Path) -> None:
    """The F2PAD paper's split: the test set's normal images are training images the model never sees."""
    build_paper(tmp_path, "brick", 5, 0, hold_out=True)
    source = sorted(p.name for p in (EMBEDDED_ROOT / "brick" / "train" / "good").glob("*.png"))
    kept = sorted(p.name for p in (tmp_path / "brick" / "train" / "good").glob("*.png"))
    assert len(kept) == len(source) - 5 and set(kept) < set(source)
    assert count_defective(tmp_path, "brick") == 5
    for name in sorted(set(source) - set(kept)):  # each held-out image is the base of one cut-paste image
        held = np.asarray(Image.open(EMBEDDED_ROOT / "brick" / "train" / "good" / name).convert("RGB"))
        bases = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "brick" / "test" / "cutpaste").glob("*.png"))]
        masks = [np.asarray(Image.open(p)) > 0
                 for p in sorted((tmp_path / "brick" / "ground_truth" / "cutpaste").glob("*.png"))]
        assert any((base[~mask] == held[~mask]).all() for base, mask in zip(bases, masks, strict=True)), name
    with pytest.raises(ValueError, match="images=60"):
        build_paper(tmp_path / "all", "brick", 60, 0, hold_out=True)
