"""Fit a tiny FaissPatchcore or MFFA with Lightning DDP on CPU (gloo) and save its checkpoint.

Run as a script (Lightning's DDP launcher starts the other ranks by running it again):
``python -m tests.ddp_fit faiss_patchcore <data root> <checkpoint> <devices> [train images]``.
The tests in ``tests/test_ddp.py`` call it in a subprocess and check the checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_mlff import MFFA, FaissPatchcore
from tests import lightning_helpers as helpers

SEED = 0


def tiny(model_name: str) -> FaissPatchcore | MFFA:
    """The tiny model of the DDP tests: resnet18, random weights, 64 px."""
    seed_everything(SEED, verbose=False)
    if model_name == "faiss_patchcore":
        return FaissPatchcore(
            backbone="resnet18",
            pre_trained=False,
            coreset_sampling_ratio=1.0,  # the whole bank: comparable row for row with one process
            seed=SEED,
            pre_processor=FaissPatchcore.configure_pre_processor(image_size=(helpers.IMAGE_SIZE,) * 2),
            visualizer=False,
        )
    return helpers.tiny_model(
        MFFA, use_lgffp=False, psg_epochs=1, n_gaussian_features=20, coreset_ratio=0.05, seed=SEED
    )


def main(model_name: str, root: str, checkpoint: str, devices: int, strategy: str = "ddp") -> None:
    """Fit on ``devices`` CPU processes and save the checkpoint (rank 0 writes it)."""
    torch.set_num_threads(1)
    model = tiny(model_name)
    engine = Engine(
        accelerator="cpu",
        strategy=strategy if devices > 1 else "auto",
        devices=devices,
        default_root_dir=Path(checkpoint).parent / f"run_{devices}",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    engine.fit(model, datamodule=helpers.datamodule(Path(root).parent, Path(root).name, batch_size=8))
    engine.trainer.save_checkpoint(checkpoint)
    if engine.trainer.global_rank == 0:
        Path(checkpoint + ".world").write_text(str(engine.trainer.world_size))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
