"""Scaling benchmark: fit time and peak memory against the number of training images, for the bounded
(streamed) coreset fit, the all-in-memory fit and anomalib's Patchcore, at several coreset ratios.

Training sets of growing size (doubling up to ``--max-images``) are built from the embedded ``brick``
training images by random crops (80-100% of the side, resized back to 128 px) and flips. Every fit runs
in its own Python process; its figures are its wall time and its peak resident memory (``ru_maxrss``).
resnet18 with random weights (no ImageNet download here), 128 px.

* bounded: ``FaissPatchcore`` with ``memory_budget_mb`` (the streamed coreset).
* all in memory: ``FaissPatchcore`` with a budget holding every embedding and
  ``coreset_oversampling=None`` (no chunk reduction: one greedy over all embeddings).
* anomalib: ``anomalib.models.Patchcore`` (its own greedy), up to ``--patchcore-max-images``.

One table: images x ratio -> seconds and peak MB of the three fits, and bounded / all-in-memory time.

    python benchmarks/bench_scale.py --ratios 0.1 0.01 --max-images 8000
    python benchmarks/bench_scale.py --min-images 20 --max-images 40 --ratios 0.1 --patchcore-max-images 40  # smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 128
SEED = 0


# --------------------------------------------------------------------------- data
def build_training_images(target: Path, count: int, seed: int = SEED) -> list[Path]:
    """``count`` augmented copies (random crop 80-100%, 128 px, random flips) of the brick training images."""
    from anomalib_mlff.data import EMBEDDED_ROOT

    sources = sorted((EMBEDDED_ROOT / "brick" / "train" / "good").glob("*.png"))
    rng = np.random.default_rng(seed)
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image = Image.open(sources[index % len(sources)])
        side = int(rng.uniform(0.8, 1.0) * image.size[0])
        left, top = (int(rng.integers(0, image.size[0] - side + 1)) for _ in range(2))
        image = image.crop((left, top, left + side, top + side)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_TOP_BOTTOM)
        path = target / f"{index:05d}.png"
        image.save(path)
        paths.append(path)
    return paths


def dataset_of_size(pool: list[Path], base: Path, count: int) -> Path:
    """An MVTec-style ``brick`` folder with the first ``count`` pool images (hard links) and the embedded test set."""
    from anomalib_mlff.data import EMBEDDED_ROOT

    root = base / f"n{count}" / "brick"
    (root / "train" / "good").mkdir(parents=True)
    for path in pool[:count]:
        os.link(path, root / "train" / "good" / path.name)  # anomalib's folder scan skips symbolic links
    for folder in ("test", "ground_truth"):
        shutil.copytree(EMBEDDED_ROOT / "brick" / folder, root / folder)
    return root


# --------------------------------------------------------------------------- child process
FITS = ("bounded", "all in memory", "anomalib")


def build_model(fit: str, budget_mb: float, ratio: float) -> object:
    from anomalib.models import Patchcore
    from lightning.pytorch import seed_everything

    from anomalib_mlff import FaissPatchcore
    from anomalib_mlff.components.streaming_coreset import DEFAULT_OVERSAMPLING

    seed_everything(SEED, verbose=False)
    if fit == "anomalib":
        return Patchcore(backbone="resnet18", pre_trained=False, coreset_sampling_ratio=ratio, visualizer=False,
                         pre_processor=Patchcore.configure_pre_processor(image_size=(IMAGE_SIZE, IMAGE_SIZE)))
    bounded = fit == "bounded"
    return FaissPatchcore(backbone="resnet18", pre_trained=False, coreset_sampling_ratio=ratio, seed=SEED,
                          memory_budget_mb=budget_mb if bounded else 1e7,  # all in memory: one greedy over all
                          coreset_oversampling=DEFAULT_OVERSAMPLING if bounded else None, visualizer=False,
                          pre_processor=FaissPatchcore.configure_pre_processor(image_size=(IMAGE_SIZE,) * 2))


def child(args: argparse.Namespace) -> None:
    """One fit in this process; prints one JSON line with its wall time and peak RSS."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    data = MVTecAD(root=root.parent, category=root.name, train_batch_size=32, eval_batch_size=32, num_workers=0)
    model = build_model(args.child, args.budget_mb, args.ratio)
    engine = Engine(accelerator="cpu", devices=1, default_root_dir=root.parent / f"run_{os.getpid()}",
                    logger=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, num_sanity_val_steps=0)
    start = time.perf_counter()
    engine.fit(model, datamodule=data)
    result = {"fit_s": round(time.perf_counter() - start, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "bank_rows": int(model.model.memory_bank.shape[0])}
    print("RESULT " + json.dumps(result), flush=True)


def run_child(fit: str, root: Path, budget_mb: float, ratio: float, threads: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", fit, "--root", str(root),
               "--budget-mb", str(budget_mb), "--ratio", str(ratio), "--threads", str(threads)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)  # noqa: S603
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(done.stderr[-3000:], file=sys.stderr)
        msg = f"child {fit} on {root} failed (exit {done.returncode})"
        raise RuntimeError(msg)
    return json.loads(lines[-1][len("RESULT "):])


# --------------------------------------------------------------------------- report
def sizes(minimum: int, maximum: int) -> list[int]:
    """``minimum``, doubling, up to and including ``maximum``."""
    out = [minimum]
    while out[-1] * 2 < maximum:
        out.append(out[-1] * 2)
    return sorted({*out, maximum})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--min-images", type=int, default=500)
    parser.add_argument("--max-images", type=int, default=8000)
    parser.add_argument("--patchcore-max-images", type=int, default=2000,
                        help="largest set anomalib's Patchcore is fitted on (its greedy takes hours beyond)")
    parser.add_argument("--budget-mb", type=float, default=1024.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=FITS)
    parser.add_argument("--root")
    parser.add_argument("--ratio", type=float, default=0.1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.child:
        child(args)
        return
    counts = sizes(args.min_images, args.max_images)
    print(f"# bench_scale: {' '.join(sys.argv[1:])}; resnet18 random init, {IMAGE_SIZE} px, budget "
          f"{args.budget_mb:g} MB, {args.threads} torch thread(s), {os.cpu_count()} CPUs", flush=True)
    print("\n| images | ratio | bounded s | bounded MB | all-in-memory s | all-in-memory MB | anomalib s "
          "| anomalib MB | bounded / all-in-memory time |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        base = Path(tmp)
        pool = build_training_images(base / "pool", max(counts))
        for count in counts:
            root = dataset_of_size(pool, base, count)
            for ratio in args.ratios:
                results = {}
                for fit in FITS:
                    if fit == "anomalib" and count > args.patchcore_max_images:
                        continue
                    results[fit] = run_child(fit, root, args.budget_mb, ratio, args.threads)
                cells = []
                for fit in FITS:
                    result = results.get(fit)
                    cells += [str(result["fit_s"]), str(result["peak_rss_mb"])] if result else ["-", "-"]
                speed = results["bounded"]["fit_s"] / max(results["all in memory"]["fit_s"], 1e-9)
                print(f"| {count} | {ratio:g} | {' | '.join(cells)} | {speed:.2f} |", flush=True)
            shutil.rmtree(root.parent)


if __name__ == "__main__":
    main()
