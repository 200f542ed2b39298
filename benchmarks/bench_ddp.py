"""DDP against one process: FaissPatchcore fitted on one and on two CPU processes (Lightning DDP, gloo) at coreset
ratios below 1, then tested alike, to show how far the bank and the metrics move.

At ratio 1 the two banks hold the same rows (``tests/test_ddp.py``). Below 1 each rank streams the embeddings of
its own shard of the training images, and the final greedy selection runs over the ranks' gathered pools, so the
coreset can differ from the one-process coreset. Per category and ratio this prints the bank sizes, the share of
the DDP bank's rows that are rows of the one-process bank, how well each bank covers all training embeddings (the
largest and the mean distance from an embedding to its nearest bank row: the greedy coreset's own criterion), and
image AUROC, pixel AUROC and pixel AUPRO of both fits on the category's embedded test set (36 images: 12 normal,
24 defective, so one swapped normal-defective pair moves image AUROC by 0.0035; 2.4 M pixels at 256 px). As the
yardstick for those differences, a second one-process fit whose greedy selection starts elsewhere (coreset seed 1,
same backbone) gives the spread between two equally good one-process coresets.

    python benchmarks/bench_ddp.py                                   # brick and grass, ratios 0.1 and 0.01
    python benchmarks/bench_ddp.py --categories brick --ratios 0.1

Each fit runs in a fresh interpreter (Lightning's DDP launcher starts the second rank by running this script
again with the same arguments); one torch thread per process. Random-initialised resnet18 (offline), 256 px.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEED = 0
IMAGE_SIZE = 256


def build_model(ratio: float, coreset_seed: int = SEED):  # noqa: ANN201 - imports stay inside (argument checks)
    """FaissPatchcore on a random-initialised resnet18 (seeded with ``SEED``) at ``IMAGE_SIZE``, coreset ratio
    ``ratio``, greedy selection seeded with ``coreset_seed``."""
    from anomalib.metrics import AUPRO, AUROC, Evaluator  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415

    from anomalib_mlff import FaissPatchcore  # noqa: PLC0415

    seed_everything(SEED, verbose=False)
    metrics = [
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
    ]
    return FaissPatchcore(
        backbone="resnet18",
        pre_trained=False,
        coreset_sampling_ratio=ratio,
        seed=coreset_seed,
        pre_processor=FaissPatchcore.configure_pre_processor(image_size=(IMAGE_SIZE, IMAGE_SIZE)),
        evaluator=Evaluator(test_metrics=metrics),
        visualizer=False,
    )


def datamodule(category: str):  # noqa: ANN201
    """anomalib's MVTecAD over the embedded category, no worker processes."""
    from anomalib.data import MVTecAD  # noqa: PLC0415

    from anomalib_mlff.data import EMBEDDED_ROOT  # noqa: PLC0415

    return MVTecAD(root=EMBEDDED_ROOT, category=category, train_batch_size=8, eval_batch_size=8, num_workers=0)


def fit_child(category: str, ratio: float, devices: int, checkpoint: Path, coreset_seed: int) -> None:
    """One fit on ``devices`` CPU processes; rank 0 saves the checkpoint and the fit's seconds."""
    import torch  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415

    torch.set_num_threads(1)
    engine = Engine(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                    default_root_dir=checkpoint.parent / f"run_{devices}", logger=False, enable_progress_bar=False,
                    enable_model_summary=False)
    start = time.perf_counter()
    engine.fit(build_model(ratio, coreset_seed), datamodule=datamodule(category))
    seconds = time.perf_counter() - start
    engine.trainer.save_checkpoint(checkpoint)
    if engine.trainer.global_rank == 0:
        Path(f"{checkpoint}.info").write_text(f"{engine.trainer.world_size} {seconds:.1f}")


def fit(category: str, ratio: float, devices: int, out: Path, coreset_seed: int) -> tuple[Path, int, float]:
    """Run :func:`fit_child` in a fresh interpreter; the checkpoint, the world size it ran on and its seconds."""
    checkpoint = out / f"{category}_{ratio}_{devices}_{coreset_seed}.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(  # noqa: S603 - our interpreter and script
        [sys.executable, __file__, "--child", category, str(ratio), str(devices), str(checkpoint), str(coreset_seed)],
        env=env, capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {devices}-process fit of {category} failed:\n{done.stderr[-3000:]}")
    world, seconds = Path(f"{checkpoint}.info").read_text().split()
    return checkpoint, int(world), float(seconds)


def training_embeddings(model, category: str):  # noqa: ANN001, ANN201
    """Every training image's patch embeddings ``(N, C)`` under ``model`` (pre-processed as in its fit)."""
    import torch  # noqa: PLC0415

    data = datamodule(category)
    data.setup()
    rows = []
    for batch in data.train_dataloader():
        embedding = model.model.embed(model.pre_processor.transform(batch.image))
        rows.append(embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1]))
    return torch.cat(rows)


def compare(category: str, ratio: float, out: Path) -> dict[str, object]:
    """Fit on one and on two processes (and once more on one with coreset seed 1), test all alike; one row."""
    import torch  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415

    from anomalib_mlff.evaluation.cost import nearest_distances  # noqa: PLC0415

    torch.set_num_threads(1)
    row: dict[str, object] = {"category": category, "ratio": ratio}  # the table's columns, in order
    banks, scores = {}, {}
    for devices, coreset_seed in ((1, SEED), (2, SEED), (1, SEED + 1)):
        checkpoint, world, seconds = fit(category, ratio, devices, out, coreset_seed)
        if world != devices:
            raise RuntimeError(f"asked for {devices} processes, the fit ran on {world}")
        model = build_model(ratio, coreset_seed)
        engine = Engine(default_root_dir=out / f"test_{devices}_{coreset_seed}", logger=False,
                        enable_progress_bar=False)
        run = "seed 1" if coreset_seed != SEED else devices
        scores[run] = engine.test(model, datamodule=datamodule(category), ckpt_path=checkpoint, verbose=False)[0]
        banks[run] = model.model.memory_bank
        if run != "seed 1":
            row[f"fit s ({devices} proc)"] = f"{seconds:.1f}"
    embeddings = training_embeddings(model, category)
    single, ddp = banks[1], banks[2]
    nearest = torch.cdist(ddp, single, compute_mode="donot_use_mm_for_euclid_dist").amin(dim=1)
    row["bank rows 1 / 2 proc"] = f"{len(single)} / {len(ddp)}"
    row["DDP rows in 1-proc bank"] = f"{100 * float((nearest < 1e-4).float().mean()):.1f}%"
    covering = {run: nearest_distances(embeddings, banks[run]) for run in (1, 2)}
    row["radius 1 / 2 proc"] = f"{float(covering[1].max()):.3f} / {float(covering[2].max()):.3f}"
    row["mean distance 1 / 2 proc"] = f"{float(covering[1].mean()):.3f} / {float(covering[2].mean()):.3f}"
    for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
        row[f"{key} 1 / 2 proc"] = f"{scores[1][key]:.4f} / {scores[2][key]:.4f}"
        row[f"{key} diff"] = f"{scores[2][key] - scores[1][key]:+.4f}"
        row[f"{key} seed 1 - seed 0 (1 proc)"] = f"{scores['seed 1'][key] - scores[1][key]:+.4f}"
    return row


def main() -> None:
    """Every (category, ratio): the two fits and their comparison, as one markdown table."""
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        fit_child(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]), int(sys.argv[6]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", nargs="+", default=["brick", "grass"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.01])
    args = parser.parse_args()
    for ratio in args.ratios:
        if not 0 < ratio < 1:
            parser.error(f"--ratios must lie in (0, 1) (ratio 1 is tests/test_ddp.py's case); got {ratio}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for category in args.categories:
            for ratio in args.ratios:
                rows.append(compare(category, ratio, Path(folder)))
                print(rows[-1], file=sys.stderr, flush=True)
    print(markdown_table(list(rows[0]), [list(row.values()) for row in rows]))


if __name__ == "__main__":
    main()
