"""Localisation test sets with exact masks, written in MVTec AD's layout (one folder per protocol).

- ``paper`` (F2PAD Sec. IV-A, Eq. 16): normal test images with a flat-colour cut-paste defect in the
  shape of one of the category's real defect masks (:func:`~anomalib_mlff.components.defects.flat_colour_paste`).
- ``realistic``: the embedded data's own defect images (scratch, stain, hole), taken evenly across kinds,
  plus material defects on normal test images (crack, contamination, worn texture, colour shift). None of
  them is drawn by F2PAD's calibration (CutPaste, scar, confetti).

Both copy the category's training images, so a model is fitted on the protocol's folder. Deterministic
for a given seed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from anomalib.data import MVTecAD
from PIL import Image

from anomalib_mlff.components.defects import MATERIAL_DEFECTS, flat_colour_paste, material_defect
from anomalib_mlff.data import EMBEDDED_ROOT

__all__ = ["build_paper", "build_realistic", "count_defective", "protocol_datamodule", "save_defect"]


def save_defect(category_root: Path, kind: str, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    """Write one defective ``uint8`` image and its boolean mask in MVTec AD's layout."""
    (category_root / "test" / kind).mkdir(parents=True, exist_ok=True)
    (category_root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(category_root / "test" / kind / f"{name}.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(category_root / "ground_truth" / kind / f"{name}_mask.png")


def build_paper(
    root: Path,
    category: str,
    images: int,
    seed: int,
    source_root: Path = EMBEDDED_ROOT,
    hold_out: bool = False,
) -> None:
    """The paper's cut-paste test set from ``source_root``'s normal images and defect masks.

    Each of the ``images`` defective images takes the shape of a mask drawn at random from the category's
    ground truth. By default the normal images are the source's normal test images (cycled) and the whole
    training set is copied. ``hold_out=True`` is the F2PAD paper's split (54 test images per category,
    165-337 training images: MVTec AD's training sets less 54): ``images`` training images drawn at random
    become the test set's normal images and are left out of the copied training set.
    """
    source, target = source_root / category, root / category
    train = sorted((source / "train" / "good").glob("*.png"))
    masks = sorted((source / "ground_truth").glob("*/*.png"))
    rng = np.random.default_rng(seed)
    if hold_out:
        if not 0 < images < len(train):
            msg = f"images={images} must be between 1 and {len(train) - 1} to hold out of {source / 'train' / 'good'}."
            raise ValueError(msg)
        held = {int(i) for i in rng.choice(len(train), images, replace=False)}
        normals = [train[i] for i in sorted(held)]
        (target / "train" / "good").mkdir(parents=True)
        for index, path in enumerate(train):
            if index not in held:
                shutil.copy2(path, target / "train" / "good" / path.name)
    else:
        normals = sorted((source / "test" / "good").glob("*.png"))
    if not normals or not masks:
        msg = f"source_root={source_root} needs {category}/test/good/*.png and {category}/ground_truth/*/*.png."
        raise FileNotFoundError(msg)
    if not hold_out:
        shutil.copytree(source / "train", target / "train")
    for index in range(images):
        normal = np.asarray(Image.open(normals[index % len(normals)]).convert("RGB"), dtype=np.float64) / 255
        defective, mask = flat_colour_paste(normal, np.asarray(Image.open(masks[rng.integers(len(masks))])) > 0, rng)
        save_defect(target, "cutpaste", f"{index:03d}", np.round(defective * 255).astype(np.uint8), mask)


def build_realistic(
    root: Path, category: str, real_images: int, material_images: int, seed: int, source_root: Path = EMBEDDED_ROOT
) -> None:
    """``real_images`` of the source's own defect images (evenly across kinds) plus material defects."""
    rng = np.random.default_rng(seed)
    source, target = source_root / category, root / category
    shutil.copytree(source / "train", target / "train")
    real = sorted((source / "test").glob("[!g]*/*.png"))  # every defect kind ("good" excluded)
    for path in [real[i] for i in np.linspace(0, len(real) - 1, real_images).round().astype(int)]:
        kind = path.parent.name
        mask = np.asarray(Image.open(source / "ground_truth" / kind / f"{path.stem}_mask.png")) > 0
        save_defect(target, kind, path.stem, np.asarray(Image.open(path).convert("RGB")), mask)
    normals = sorted((source / "test" / "good").glob("*.png"))
    kinds = list(MATERIAL_DEFECTS)
    for index in range(material_images):
        gray = np.asarray(Image.open(normals[index % len(normals)]).convert("L"))
        image, mask = material_defect(gray, kinds[index % len(kinds)], rng)
        save_defect(target, kinds[index % len(kinds)], f"{index:03d}", image, mask)


def protocol_datamodule(root: Path, category: str) -> MVTecAD:
    """anomalib's ``MVTecAD`` over one protocol folder (batch 16 for training, 4 for evaluation)."""
    return MVTecAD(root=root, category=category, train_batch_size=16, eval_batch_size=4, num_workers=0)


def count_defective(root: Path, category: str) -> int:
    """Defective test images of ``category`` under ``root`` (every test folder but ``good``)."""
    return len([p for p in (root / category / "test").glob("*/*.png") if p.parent.name != "good"])
