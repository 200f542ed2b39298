"""Memory bank benchmark: coreset selection and nearest-neighbour search against anomalib's own.

Everything is measured in one run on the same data: PatchCore embeddings (pooled layer2+layer3,
concatenated, as ``PatchcoreModel`` makes them) of the embedded images with randomly initialised
backbones (``pre_trained=False``: ImageNet weights cannot be downloaded here).

* Coreset: resnet18, 60 training images at 256 px = 61,440 x 384, 10% coreset; anomalib's
  ``KCenterGreedy`` vs :func:`greedy_coreset` (time, coverage radius in the original space).
* Search: wide_resnet50_2, a 1/3 greedy coreset of its 61,440 x 1,536 training embeddings =
  20,480 x 1,536 (the size of a 10% coreset of 200 images); queries are the test images'
  embeddings. anomalib's ``PatchcoreModel.nearest_neighbors`` vs :class:`FaissMemoryBank`
  (exact and approximate; best of two timed runs each; recall@1 against anomalib's answers).
* AUROC: ``FaissPatchcore`` (exact) vs anomalib's ``Patchcore``, resnet18, 128 px, 10% coreset,
  same backbone weights, three coreset seeds each.

    python benchmarks/bench_memory_bank.py
    python benchmarks/bench_memory_bank.py --skip-coreset --skip-auroc --query-images 4
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import faiss
import torch
from anomalib.data.utils import read_image
from anomalib.engine import Engine
from anomalib.models import Patchcore
from anomalib.models.components import KCenterGreedy
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from lightning.pytorch import seed_everything

from anomalib_mlff import FaissMemoryBank, FaissPatchcore, greedy_coreset
from anomalib_mlff.components.memory_bank import faiss_gpu_available
from anomalib_mlff.data import EMBEDDED_ROOT, embedded_datamodule
from anomalib_mlff.evaluation.cost import coverage_radius

LAYERS = ("layer2", "layer3")
SEARCH_SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("FAISS exact (flat)", {}),
    ("FAISS HNSW16 ef=32", {"approximate": True}),
    ("FAISS HNSW16 ef=32 fp16", {"approximate": True, "fp16": True}),
    ("FAISS IVF nprobe=16", {"approximate": True, "index_type": "ivf"}),
    ("FAISS IVF nprobe=16 fp16", {"approximate": True, "index_type": "ivf", "fp16": True}),
)


def patchcore_embeddings(backbone: str, folder: str, size: int, every: int = 1, device: str = "cpu") -> torch.Tensor:
    """PatchcoreModel's training embeddings of every ``every``-th brick image under ``folder``."""
    paths = sorted((EMBEDDED_ROOT / "brick" / folder).rglob("*.png"))[::every]
    pre_processor = Patchcore.configure_pre_processor(image_size=(size, size))
    torch.manual_seed(0)
    model = PatchcoreModel(layers=list(LAYERS), backbone=backbone, pre_trained=False).train().to(device)
    batches = []
    with torch.no_grad():
        for start in range(0, len(paths), 10):
            images = torch.stack([read_image(path, as_tensor=True) for path in paths[start : start + 10]])
            batches.append(model(pre_processor.transform(images).to(device)))
    return torch.cat(batches)


def timed(function: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_coreset(device: str) -> None:
    embeddings = patchcore_embeddings("resnet18", "train", 256, device=device)
    print(f"\n### Coreset: {tuple(embeddings.shape)} embeddings (resnet18 layer2+3, 256 px), 10% coreset, {device}\n")
    torch.manual_seed(0)
    theirs_s, theirs = timed(lambda: KCenterGreedy(embedding=embeddings, sampling_ratio=0.1).select_coreset_idxs())
    ours_s, ours = timed(lambda: greedy_coreset(embeddings, 0.1, seed=0, progress=False))
    theirs_r = coverage_radius(embeddings, torch.tensor(theirs, device=embeddings.device))
    ours_r = coverage_radius(embeddings, ours)
    print("| implementation | coreset | seconds | speed-up | coverage radius | radius / anomalib's |")
    print("|---|---|---|---|---|---|")
    print(f"| anomalib KCenterGreedy | {len(theirs)} | {theirs_s:.2f} | 1.0x | {theirs_r:.4f} | 1.000 |")
    print(f"| greedy_coreset | {len(ours)} | {ours_s:.2f} | {theirs_s / ours_s:.1f}x | {ours_r:.4f} | "
          f"{ours_r / theirs_r:.3f} |")


def bench_search(device: str, query_images: int) -> None:
    train = patchcore_embeddings("wide_resnet50_2", "train", 256, device=device)
    select_s, indices = timed(partial(greedy_coreset, train, 1 / 3, seed=0, progress=False))
    bank = train[indices].contiguous()
    del train
    test_count = len(list((EMBEDDED_ROOT / "brick" / "test").rglob("*.png")))
    every = max(1, test_count // query_images)
    queries = patchcore_embeddings("wide_resnet50_2", "test", 256, every=every, device=device)
    print(f"\n### Search: bank {tuple(bank.shape)} (wide_resnet50_2 layer2+3, 256 px; "
          f"its coreset took {select_s:.1f} s), "
          f"{len(queries)} queries from {len(queries) // 1024} test images, k=1, {device}\n")
    anomalib_model = PatchcoreModel(layers=list(LAYERS), backbone="resnet18", pre_trained=False).to(device)
    anomalib_model.memory_bank = bank
    anomalib_s, (_, expected) = timed(lambda: anomalib_model.nearest_neighbors(queries, n_neighbors=1), repeats=2)
    print("| search | build s | search s | queries/s | speed-up vs anomalib | recall@1 |")
    print("|---|---|---|---|---|---|")
    print(f"| anomalib nearest_neighbors (exact) | - | {anomalib_s:.2f} | {len(queries) / anomalib_s:.0f} | 1.0x | "
          "1.0000 |")
    for name, options in SEARCH_SETTINGS:
        memory = FaissMemoryBank(**options).set_memory(bank)
        build_s, _ = timed(memory.build_index)
        search_s, (_, found) = timed(lambda memory=memory: memory.search(queries, 1), repeats=2)
        recall = float((found[:, 0] == expected).float().mean())
        print(f"| {name} | {build_s:.2f} | {search_s:.2f} | {len(queries) / search_s:.0f} | "
              f"{anomalib_s / search_s:.1f}x | {recall:.4f} |")
    torch_s, (_, found) = timed(lambda: FaissMemoryBank().set_memory(bank).exact_search(queries, 1), repeats=2)
    recall = float((found[:, 0] == expected).float().mean())
    print(f"| torch exact_search (export path) | - | {torch_s:.2f} | {len(queries) / torch_s:.0f} | "
          f"{anomalib_s / torch_s:.1f}x | {recall:.4f} |")


def auroc_of(
    model_class: type[Patchcore], category: str, coreset_seed: int, **options: Any  # noqa: ANN401
) -> tuple[float, float]:
    """Image and pixel AUROC of a 128 px resnet18 model; backbone from seed 0, coreset from ``coreset_seed``."""
    seed_everything(0, verbose=False)
    model = model_class(backbone="resnet18", pre_trained=False, coreset_sampling_ratio=0.1, visualizer=False,
                        pre_processor=model_class.configure_pre_processor(image_size=(128, 128)), **options)
    data = embedded_datamodule(category, train_batch_size=32, eval_batch_size=32)
    with tempfile.TemporaryDirectory(prefix="bench_mb_") as root:
        engine = Engine(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
        seed_everything(coreset_seed, verbose=False)  # anomalib's KCenterGreedy draws from the global RNGs
        engine.fit(model, datamodule=data)
        metrics = engine.test(model, datamodule=data, verbose=False)[0]
    return metrics["image_AUROC"], metrics["pixel_AUROC"]


def bench_auroc() -> None:
    print("\n### AUROC: resnet18 (random init, same weights), 128 px, 10% coreset, global seeds 0/1/2\n")
    print("| category | model | image AUROC per seed | pixel AUROC per seed | image spread | pixel spread "
          "| max abs diff to anomalib (image / pixel) |")
    print("|---|---|---|---|---|---|---|")
    for category in ("brick", "grass"):
        reference: list[tuple[float, float]] = []
        for name, runner in (
            ("anomalib Patchcore", lambda seed, c=category: auroc_of(Patchcore, c, seed)),
            ("FaissPatchcore (default seed=None)", lambda seed, c=category: auroc_of(FaissPatchcore, c, seed)),
            (
                "FaissPatchcore (seed=global seed)",
                lambda seed, c=category: auroc_of(FaissPatchcore, c, seed, seed=seed),
            ),
        ):
            results = [runner(seed) for seed in range(3)]
            reference = reference or results
            images, pixels = [r[0] for r in results], [r[1] for r in results]
            image_diff = max(abs(a[0] - b[0]) for a, b in zip(results, reference, strict=True))
            pixel_diff = max(abs(a[1] - b[1]) for a, b in zip(results, reference, strict=True))
            print(f"| {category} | {name} | {' / '.join(f'{v:.4f}' for v in images)} | "
                  f"{' / '.join(f'{v:.4f}' for v in pixels)} | {max(images) - min(images):.4f} | "
                  f"{max(pixels) - min(pixels):.4f} | {image_diff:.4f} / {pixel_diff:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--query-images", type=int, default=12, help="test images whose embeddings are the queries")
    parser.add_argument("--skip-coreset", action="store_true")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--skip-auroc", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print(f"{platform.processor() or platform.machine()}, torch threads={torch.get_num_threads()}, "
          f"faiss threads={faiss.omp_get_max_threads()}, faiss GPU={faiss_gpu_available()}, device={args.device}, "
          f"torch {torch.__version__}, faiss {faiss.__version__}")
    if not args.skip_coreset:
        bench_coreset(args.device)
    if not args.skip_search:
        bench_search(args.device, args.query_images)
    if not args.skip_auroc:
        bench_auroc()


if __name__ == "__main__":
    main()
