"""F2PAD benchmark on the embedded data: the paper's protocol and a realistic one, old code vs new, one run.

Protocols (one MVTec-layout folder each, built deterministically; masks exact):

- ``paper`` (F2PAD Sec. IV-A, Eq. 16): normal test images with a cut-paste defect, X = (1 - M) X_normal +
  M A, A one random colour, M a real defect mask of the category rescaled and placed at random; a colour
  closer than ``MIN_COLOUR_DISTANCE`` to the covered pixels is redrawn.
- ``realistic``: the embedded data's own defect images (scratch, stain, hole), taken evenly across kinds,
  plus material defects on normal test images (crack, contamination, worn texture, colour shift; see
  ``material_defects.py``). None of them is drawn by F2PAD's calibration (CutPaste, scar, confetti).

Models: anomalib's PatchCore (resnet18 layers 2+3) and PaDiM (resnet18), random initialisation, 256 px.
Each (model, category) is fitted once (with ``--calibration-images`` the fit ends with F2PAD's calibration);
each protocol's test set then sets anomalib's F1-optimal pixel threshold (``Engine.validate``; the paper's
oracle threshold) and is tested with F2PAD disabled (the backbone's mask) and enabled. "old" rows are the
code of ``--baseline`` (default: the commit before issue 11), run in a child process on the same checkpoint
and images, with that code's defaults. Reports IoU/DICE (x100, mean over images) before/after, seconds per
image of the test pass, and how many images the do-no-harm rule kept at the backbone's mask.

    python benchmarks/bench_f2pad.py                         # both categories, both models, old vs new
    python benchmarks/bench_f2pad.py --categories brick --models PaDiM --paper-images 2 --real-images 2 \\
        --material-images 2 --no-baseline
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.metrics import AnomalibMetric, Evaluator
from anomalib.models import Padim, Patchcore
from lightning.pytorch import seed_everything
from PIL import Image
from torchmetrics import SumMetric

from anomalib_mlff import F2PAD, Dice, IoU
from anomalib_mlff.data import EMBEDDED_ROOT

sys.path.insert(0, str(Path(__file__).parent))
from material_defects import MATERIAL_DEFECTS, material_defect  # noqa: E402

MIN_COLOUR_DISTANCE = 0.3
SCALE_RANGE = (0.75, 1.5)
BASELINE = "c7b5d1d"  # the code before issue 11
MODELS = {"PatchCore": Patchcore, "PaDiM": Padim}
ARGUMENTS = {
    "PatchCore": {"backbone": "resnet18", "pre_trained": False, "layers": ("layer2", "layer3")},
    "PaDiM": {"backbone": "resnet18", "pre_trained": False},
}


def cut_paste(normal: np.ndarray, mask_source: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One defective image (Eq. 16) from a normal RGB image in [0, 1] and a binary defect mask."""
    rows, cols = np.nonzero(mask_source)
    shape = mask_source[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = normal.shape[:2]
    scale = rng.uniform(*SCALE_RANGE)
    new_size = (
        max(2, min(width - 2, round(shape.shape[1] * scale))),
        max(2, min(height - 2, round(shape.shape[0] * scale))),
    )
    shape = np.asarray(Image.fromarray(shape.astype(np.uint8) * 255).resize(new_size, Image.NEAREST)) > 0
    if rng.random() < 0.5:
        shape = shape[:, ::-1]
    top = rng.integers(0, height - shape.shape[0] + 1)
    left = rng.integers(0, width - shape.shape[1] + 1)
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + shape.shape[0], left : left + shape.shape[1]] = shape
    while True:
        colour = rng.random(3)
        if np.linalg.norm(normal[mask] - colour, axis=1).mean() >= MIN_COLOUR_DISTANCE:
            break
    defective = np.where(mask[..., None], colour, normal)
    return defective, mask


def _save(category_root: Path, kind: str, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    """Write one defective image and its mask in MVTec AD's layout."""
    (category_root / "test" / kind).mkdir(parents=True, exist_ok=True)
    (category_root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(category_root / "test" / kind / f"{name}.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(category_root / "ground_truth" / kind / f"{name}_mask.png")


def build_paper(root: Path, category: str, images: int, seed: int, source_root: Path = EMBEDDED_ROOT) -> None:
    """The paper's cut-paste test set (normal images and masks of ``source_root``): flat colours in defect shapes."""
    rng = np.random.default_rng(seed)
    source, target = source_root / category, root / category
    shutil.copytree(source / "train", target / "train")
    normals = sorted((source / "test" / "good").glob("*.png"))
    masks = sorted((source / "ground_truth").glob("*/*.png"))
    for index in range(images):
        normal = np.asarray(Image.open(normals[index % len(normals)]).convert("RGB"), dtype=np.float64) / 255
        defective, mask = cut_paste(normal, np.asarray(Image.open(masks[rng.integers(len(masks))])) > 0, rng)
        _save(target, "cutpaste", f"{index:03d}", np.round(defective * 255).astype(np.uint8), mask)


def build_realistic(root: Path, category: str, real_images: int, material_images: int, seed: int) -> None:
    """The embedded data's own defects (evenly across kinds) plus material defects on normal test images."""
    rng = np.random.default_rng(seed)
    source, target = EMBEDDED_ROOT / category, root / category
    shutil.copytree(source / "train", target / "train")
    real = sorted((source / "test").glob("[!g]*/*.png"))  # every defect kind ("good" excluded)
    for path in [real[i] for i in np.linspace(0, len(real) - 1, real_images).round().astype(int)]:
        kind = path.parent.name
        mask = np.asarray(Image.open(source / "ground_truth" / kind / f"{path.stem}_mask.png")) > 0
        _save(target, kind, path.stem, np.asarray(Image.open(path).convert("RGB")), mask)
    normals = sorted((source / "test" / "good").glob("*.png"))
    kinds = list(MATERIAL_DEFECTS)
    for index in range(material_images):
        gray = np.asarray(Image.open(normals[index % len(normals)]).convert("L"))
        image, mask = material_defect(gray, kinds[index % len(kinds)], rng)
        _save(target, kinds[index % len(kinds)], f"{index:03d}", image, mask)


class FallbackCount(AnomalibMetric, SumMetric):  # type: ignore[misc]
    """Images whose F2PAD refinement was not trusted (``f2pad_fallback``), summed over the test set."""

    default_fields = ("f2pad_fallback",)


def evaluator() -> Evaluator:
    """IoU/DICE of ``pred_mask`` (the backbone's with F2PAD disabled) and the fallback count (new code only)."""
    metrics = [metric(fields=["pred_mask", "gt_mask"]) for metric in (IoU, Dice)]
    metrics.append(FallbackCount(fields=["f2pad_fallback"], strict=False))
    return Evaluator(val_metrics=[], test_metrics=metrics)


@dataclass
class Row:
    """One (code, model, category, protocol) result."""

    code: str
    model: str
    category: str
    protocol: str
    images: int
    iou_before: float
    iou_after: float
    dice_before: float
    dice_after: float
    seconds_backbone: float
    seconds_f2pad: float
    fallbacks: float
    refines: bool | None = None  # the calibration's verdict (new code)


def datamodule(root: Path, category: str) -> MVTecAD:
    return MVTecAD(root=root, category=category, train_batch_size=16, eval_batch_size=4, num_workers=0)


def count_images(root: Path, category: str) -> int:
    return len([p for p in (root / category / "test").glob("*/*.png") if p.parent.name != "good"])


def measure(
    code: str, model, engine: Engine, name: str, category: str, roots: dict[str, Path]  # noqa: ANN001
) -> list[Row]:
    """Validate (threshold) and test each protocol with F2PAD disabled and enabled."""
    rows = []
    for protocol, root in roots.items():
        data = datamodule(root, category)
        images = count_images(root, category)
        model.post_processor.enabled = False
        engine.validate(model, datamodule=data, verbose=False)  # this protocol's F1-optimal pixel threshold
        start = time.perf_counter()
        before = engine.test(model, datamodule=data, verbose=False)[0]
        seconds_backbone = (time.perf_counter() - start) / images
        model.post_processor.enabled = True
        start = time.perf_counter()
        after = engine.test(model, datamodule=data, verbose=False)[0]
        seconds_f2pad = (time.perf_counter() - start) / images
        rows.append(Row(code, name, category, protocol, images, 100 * before["IoU"], 100 * after["IoU"],
                        100 * before["Dice"], 100 * after["Dice"], seconds_backbone, seconds_f2pad,
                        float(after.get("FallbackCount", float("nan")))))
    calibration = getattr(model.post_processor, "calibration", None)
    for row in rows:
        row.refines = None if calibration is None else bool(calibration["refines"])
    return rows


def engine_for(out: Path) -> Engine:
    return Engine(default_root_dir=out, logger=False, enable_progress_bar=False, max_epochs=1)


def run_new(
    name: str, category: str, roots: dict[str, Path], seed: int, out: Path, f2pad: dict, pre_trained: bool = False
) -> tuple[list[Row], Path]:
    """Fit with this code's F2PAD (calibrating at the end), save the checkpoint, measure every protocol."""
    seed_everything(seed, workers=True)
    arguments = {**ARGUMENTS[name], "pre_trained": pre_trained}
    model = MODELS[name](**arguments, post_processor=F2PAD(**f2pad), evaluator=evaluator())
    engine = engine_for(out / name / category)
    engine.fit(model, datamodule=datamodule(roots["paper"], category))
    checkpoint = out / name / category / "bench.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    calibration = model.post_processor.calibration
    if calibration:
        best = max(score for _, score in calibration["trials"])
        print(f"{name} {category}: calibration {calibration['weights']}, IoU on synthetic defects "
              f"{100 * calibration['initial_iou']:.1f} -> {100 * best:.1f}, refines: {calibration['refines']}",
              file=sys.stderr, flush=True)
    return measure("new", model, engine, name, category, roots), checkpoint


def run(
    name: str,
    category: str,
    root: Path,
    seed: int,
    out: Path,
    pre_trained: bool = False,
    f2pad_settings: dict | None = None,
) -> Row:
    """One model on one protocol folder (``build_paper``'s, say) with this code: for other scripts."""
    rows, _ = run_new(name, category, {"paper": root}, seed, out, f2pad_settings or {}, pre_trained)
    return rows[0]


def run_old(name: str, category: str, roots: dict[str, Path], checkpoint: Path, out: Path) -> list[Row]:
    """In the baseline code's process: load the fitted model, reset F2PAD to that code's defaults, measure."""
    model = MODELS[name].load_from_checkpoint(checkpoint, post_processor=F2PAD(), evaluator=evaluator())
    defaults = F2PAD()
    for key in defaults._checkpoint_config_keys:  # noqa: SLF001 - the settings the checkpoint carried
        if key not in {"enabled"} and hasattr(defaults, key) and not key.startswith(("pixel_", "image_")):
            setattr(model.post_processor, key, getattr(defaults, key))
    return measure("old", model, engine_for(out / "old" / name / category), name, category, roots)


def baseline_rows(revision: str, jobs: list[dict], out: Path) -> list[Row]:
    """Run ``run_old`` for every job under the code of ``revision`` (its package on PYTHONPATH)."""
    code = out / f"code_{revision}"
    archive = subprocess.run(["git", "archive", revision, "anomalib_mlff"], check=True, capture_output=True,
                             cwd=Path(__file__).parent.parent).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(code, filter="data")
    spec = out / "jobs.json"
    spec.write_text(json.dumps(jobs))
    environment = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, __file__, "--old-child", str(spec), "--threads", str(torch.get_num_threads())]
    result = subprocess.run(command, env=environment, check=True, capture_output=True, text=True)
    return [Row(**row) for row in json.loads(result.stdout.strip().splitlines()[-1])]


def old_child(spec: Path) -> None:
    """Entry point of the baseline process: print its rows as one JSON line."""
    import anomalib_mlff  # noqa: PLC0415

    assert "code_" in anomalib_mlff.__file__, anomalib_mlff.__file__  # the baseline's package, not this one
    rows = []
    for job in json.loads(spec.read_text()):
        roots = {key: Path(value) for key, value in job["roots"].items()}
        rows.extend(run_old(job["model"], job["category"], roots, Path(job["checkpoint"]), Path(job["out"])))
    print(json.dumps([asdict(row) for row in rows]))


def print_table(rows: list[Row]) -> None:
    print("| code | model | category | protocol | images | IoU before | IoU after | gain | DICE before | DICE after "
          "| gain | s/img backbone | s/img F2PAD | kept backbone mask |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        kept = "-" if np.isnan(row.fallbacks) else f"{int(row.fallbacks)}"
        print(f"| {row.code} | {row.model} | {row.category} | {row.protocol} | {row.images} "
              f"| {row.iou_before:.1f} | {row.iou_after:.1f} | {row.iou_after - row.iou_before:+.1f} "
              f"| {row.dice_before:.1f} | {row.dice_after:.1f} | {row.dice_after - row.dice_before:+.1f} "
              f"| {row.seconds_backbone:.2f} | {row.seconds_f2pad:.2f} | {kept} |")


def print_summary(rows: list[Row]) -> None:
    """Mean IoU gain per (code, model, protocol), worst category, and the old/new time ratio."""
    print("\n| code | model | protocol | mean IoU gain | worst category gain | s/img F2PAD |")
    print("|---|---|---|---|---|---|")
    keys = sorted({(row.code, row.model, row.protocol) for row in rows}, key=lambda k: (k[1], k[2], k[0] != "old"))
    for code, model, protocol in keys:
        selected = [r for r in rows if (r.code, r.model, r.protocol) == (code, model, protocol)]
        gains = [r.iou_after - r.iou_before for r in selected]
        seconds = np.mean([r.seconds_f2pad for r in selected])
        print(f"| {code} | {model} | {protocol} | {np.mean(gains):+.1f} | {min(gains):+.1f} | {seconds:.2f} |")
        if code == "new" and all(row.refines is not None for row in selected):
            # calibration_veto=True keeps the backbone's masks where the calibration saw no gain
            vetoed = [gain if row.refines else 0.0 for gain, row in zip(gains, selected, strict=True)]
            print(f"| new, calibration_veto | {model} | {protocol} | {np.mean(vetoed):+.1f} | {min(vetoed):+.1f} | - |")
    for model in sorted({row.model for row in rows}):
        old = [r.seconds_f2pad * r.images for r in rows if r.model == model and r.code == "old"]
        new = [r.seconds_f2pad * r.images for r in rows if r.model == model and r.code == "new"]
        if old and new:
            print(f"\n{model}: old / new time per image with F2PAD (all protocols): {sum(old) / sum(new):.2f}x")


def main() -> None:
    """Build the protocols, run the new code, then the baseline on the same checkpoints, and print tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", nargs="+", default=["brick", "grass"])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--paper-images", type=int, default=4, help="cut-paste images per category")
    parser.add_argument("--real-images", type=int, default=4, help="embedded defect images per category")
    parser.add_argument("--material-images", type=int, default=4, help="material defect images per category")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-images", type=int, help="F2PAD's calibration_images (default: its own)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the 'old' code")
    parser.add_argument("--no-baseline", action="store_true", help="only the new code")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--old-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.old_child:
        old_child(args.old_child)
        return
    f2pad = {} if args.calibration_images is None else {"calibration_images": args.calibration_images}
    rows, jobs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for category in args.categories:
            roots = {"paper": out / "paper", "realistic": out / "realistic"}
            build_paper(roots["paper"], category, args.paper_images, args.seed)
            build_realistic(roots["realistic"], category, args.real_images, args.material_images, args.seed)
            for name in args.models:
                new_rows, checkpoint = run_new(name, category, roots, args.seed, out / "results", f2pad)
                rows.extend(new_rows)
                jobs.append({"model": name, "category": category, "checkpoint": str(checkpoint),
                             "roots": {k: str(v) for k, v in roots.items()}, "out": str(out / "results")})
        if not args.no_baseline:
            rows.extend(baseline_rows(args.baseline, jobs, out))
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}")
    rows.sort(key=lambda r: (r.model, r.protocol, r.category, r.code != "old"))
    print_table(rows)
    print_summary(rows)
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=1))


if __name__ == "__main__":
    main()
