"""Scaling benchmark: peak memory of the fit against the number of training images, streamed vs
all-in-memory coreset, and a 2-process DDP fit (gloo, CPU) against one process.

Training sets of growing size are built from the embedded ``brick`` training images by random crops
(80-100% of the side, resized back to 128 px) and flips; the test set is the embedded one. Every fit
runs in its own Python process, whose peak resident memory (``ru_maxrss``) is the figure. Models:
resnet18 with random weights (no ImageNet download here), 128 px.

* anomalib's ``Patchcore``: its greedy coreset takes hours at the larger sizes on a CPU, so its peak
  is taken when its coreset selection starts (all embeddings collected and concatenated).
* ``FaissPatchcore`` with ``memory_budget_mb`` (streamed) and with a budget holding everything.
* ``MFFA`` without PSG and LGFFP (the fill pass is what scales): NNS bank streamed, Gaussians
  accumulated.

    python benchmarks/bench_scale.py                       # everything
    python benchmarks/bench_scale.py --sizes 250 500 --skip-ddp
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

REPO_ROOT = Path(__file__).resolve().parents[1]
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
class _CoresetStarts(Exception):  # noqa: N818 - a signal, not an error
    """Raised where anomalib's coreset selection would start: its embeddings are all in memory."""


def build_model(name: str, budget_mb: float, ratio: float) -> object:
    from anomalib.models import Patchcore
    from lightning.pytorch import seed_everything

    from anomalib_mlff import MFFA, FaissPatchcore

    seed_everything(SEED, verbose=False)
    if name == "Patchcore":
        return Patchcore(backbone="resnet18", pre_trained=False, coreset_sampling_ratio=ratio, visualizer=False,
                         pre_processor=Patchcore.configure_pre_processor(image_size=(IMAGE_SIZE, IMAGE_SIZE)))
    if name == "FaissPatchcore":
        return FaissPatchcore(backbone="resnet18", pre_trained=False, coreset_sampling_ratio=ratio, seed=SEED,
                              memory_budget_mb=budget_mb, visualizer=False,
                              pre_processor=FaissPatchcore.configure_pre_processor(image_size=(IMAGE_SIZE,) * 2))
    return MFFA(backbone="resnet18", pre_trained=False, use_psg=False, use_lgffp=False, n_gaussian_features=100,
                memory_budget_mb=budget_mb, seed=SEED, visualizer=False,
                pre_processor=MFFA.configure_pre_processor(image_size=(IMAGE_SIZE, IMAGE_SIZE)))


def child(args: argparse.Namespace) -> None:
    """One fit (and test) in this process; prints one JSON line with its peak RSS, wall time and AUROCs."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models.components import KCenterGreedy

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    data = MVTecAD(root=root.parent, category=root.name, train_batch_size=32, eval_batch_size=32, num_workers=0)
    result: dict[str, object] = {"model": args.child, "budget_mb": args.budget_mb, "devices": args.devices}
    if args.test_checkpoint:
        from anomalib_mlff import FaissPatchcore

        model = FaissPatchcore.load_from_checkpoint(args.test_checkpoint)
    else:
        model = build_model(args.child, args.budget_mb, args.ratio)
    engine = Engine(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                    default_root_dir=Path(args.root).parent / f"run_{args.child}_{args.devices}_{os.getpid()}",
                    logger=False, enable_progress_bar=False, enable_model_summary=False)
    if args.child == "Patchcore":
        def stop(*_: object, **__: object) -> None:
            raise _CoresetStarts
        KCenterGreedy.sample_coreset = stop
    start = time.perf_counter()
    try:
        if not args.test_checkpoint:
            engine.fit(model, datamodule=data)
    except _CoresetStarts:
        result["stopped"] = "at coreset selection"
    result["fit_s"] = round(time.perf_counter() - start, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if args.checkpoint:
        engine.trainer.save_checkpoint(args.checkpoint)
        result["bank_rows"] = int(model.model.memory_bank.shape[0])
    if not args.test_checkpoint and engine.trainer.global_rank != 0:
        return
    if args.test and "stopped" not in result:
        metrics = Engine(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         default_root_dir=Path(args.root).parent / "test_run").test(
            model, datamodule=data, verbose=False)[0]
        result.update({key: round(float(metrics[key]), 4) for key in ("image_AUROC", "pixel_AUROC")})
    print("RESULT " + json.dumps(result), flush=True)


def run_child(model: str, root: Path, budget_mb: float, ratio: float, threads: int, devices: int = 1,
              test: bool = False, checkpoint: Path | None = None, test_checkpoint: Path | None = None) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", model, "--root", str(root),
               "--budget-mb", str(budget_mb), "--ratio", str(ratio), "--threads", str(threads),
               "--devices", str(devices)]
    command += ["--test"] if test else []
    command += ["--checkpoint", str(checkpoint)] if checkpoint else []
    command += ["--test-checkpoint", str(test_checkpoint)] if test_checkpoint else []
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)  # noqa: S603
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(done.stderr[-3000:], file=sys.stderr)
        msg = f"child {model} on {root} failed (exit {done.returncode})"
        raise RuntimeError(msg)
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_s"] = round(time.perf_counter() - start, 1)
    return result


# --------------------------------------------------------------------------- coverage radius
def radius_comparison(pool: list[Path], count: int, budget_mb: float, ratio: float) -> dict:
    """Coverage radius of the streamed vs the all-in-memory greedy coreset on ``count`` images' embeddings."""
    from anomalib.data.utils import read_image
    from anomalib.models import Patchcore
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    from anomalib_mlff.components.coreset import greedy_coreset
    from anomalib_mlff.components.streaming_coreset import StreamingCoreset

    transform = Patchcore.configure_pre_processor(image_size=(IMAGE_SIZE, IMAGE_SIZE)).transform
    torch.manual_seed(SEED)
    model = PatchcoreModel(layers=["layer2", "layer3"], backbone="resnet18", pre_trained=False).train()
    store = StreamingCoreset(ratio, budget_mb, seed=SEED, progress=False)
    parts = []
    with torch.no_grad():
        for first in range(0, count, 32):
            batch = pool[first : min(first + 32, count)]  # not past `count` when the pool holds more images
            images = torch.stack([read_image(path, as_tensor=True) for path in batch])
            embedding = model(transform(images))
            model.embedding_store.clear()
            store.append(embedding)
            parts.append(embedding)
    embeddings = torch.cat(parts)
    reductions = store.reductions
    streamed = store.finish()
    exact = embeddings[greedy_coreset(embeddings, ratio, seed=SEED, progress=False)]

    def radius(coreset: torch.Tensor) -> float:
        return max(float(torch.cdist(chunk, coreset).amin(dim=1).max()) for chunk in embeddings.split(4096))

    return {"images": count, "embeddings": len(embeddings), "reductions": reductions,
            "streamed": radius(streamed), "all_in_memory": radius(exact)}


# --------------------------------------------------------------------------- report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[250, 500, 1000, 2000])
    parser.add_argument("--budget-mb", type=float, default=384.0)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--auroc-sizes", type=int, nargs="*", default=[250, 1000])
    parser.add_argument("--radius-size", type=int, default=250)
    parser.add_argument("--radius-budget-mb", type=float, default=96.0)
    parser.add_argument("--ddp-size", type=int, default=250)
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--root")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--test", action="store_true")
    parser.add_argument("--checkpoint")
    parser.add_argument("--test-checkpoint")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.child:
        child(args)
        return
    print(f"# bench_scale: {' '.join(sys.argv[1:])}; resnet18 random init, {IMAGE_SIZE} px, ratio {args.ratio}, "
          f"budget {args.budget_mb:g} MB, {args.threads} torch thread(s), {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        base = Path(tmp)
        pool = build_training_images(base / "pool", max([*args.sizes, *args.auroc_sizes, args.ddp_size]))
        roots = {count: dataset_of_size(pool, base, count) for count in sorted({*args.sizes, *args.auroc_sizes,
                                                                                   args.ddp_size})}
        print("\n| images | model | budget MB | peak RSS MB | fit s (contended) | note |\n|---|---|---|---|---|---|")
        for count in args.sizes:
            for model, budget in (("Patchcore", 0), ("FaissPatchcore", args.budget_mb), ("MFFA", args.budget_mb)):
                result = run_child(model, roots[count], budget or 1.0, args.ratio, args.threads)
                print(f"| {count} | {model} | {budget or '-'} | {result['peak_rss_mb']} | {result['fit_s']} | "
                      f"{result.get('stopped', '')} |", flush=True)
        print("\n| images | FaissPatchcore fit | image AUROC | pixel AUROC | peak RSS MB |\n|---|---|---|---|---|")
        for count in args.auroc_sizes:
            for label, budget in (("streamed", args.budget_mb), ("all in memory", 1e6)):
                result = run_child("FaissPatchcore", roots[count], budget, args.ratio, args.threads, test=True)
                print(f"| {count} | {label} | {result['image_AUROC']} | {result['pixel_AUROC']} | "
                      f"{result['peak_rss_mb']} |", flush=True)
        radius = radius_comparison(pool, args.radius_size, args.radius_budget_mb, args.ratio)
        print(f"\ncoverage radius, {radius['images']} images = {radius['embeddings']} embeddings, budget "
              f"{args.radius_budget_mb:g} MB ({radius['reductions']} reductions): streamed {radius['streamed']:.4f}, "
              f"all-in-memory {radius['all_in_memory']:.4f}, ratio {radius['streamed'] / radius['all_in_memory']:.3f}",
              flush=True)
        if args.skip_ddp:
            return
        print("\n| FaissPatchcore, DDP | processes | fit s (contended) | bank rows | image AUROC | pixel AUROC |"
              "\n|---|---|---|---|---|---|")
        for devices in (1, 2):
            checkpoint = base / f"ddp_{devices}.ckpt"
            fit = run_child("FaissPatchcore", roots[args.ddp_size], args.budget_mb, args.ratio, args.threads,
                            devices=devices, checkpoint=checkpoint)
            scores = run_child("FaissPatchcore", roots[args.ddp_size], args.budget_mb, args.ratio, args.threads,
                               test=True, test_checkpoint=checkpoint)
            print(f"| {args.ddp_size} images | {devices} | {fit['fit_s']} | {fit['bank_rows']} | "
                  f"{scores['image_AUROC']} | {scores['pixel_AUROC']} |", flush=True)


if __name__ == "__main__":
    main()
