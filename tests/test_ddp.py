"""Fitting under DDP on CPU (gloo): the collectives with uneven and empty ranks, and 2-process Lightning fits
of FaissPatchcore and MFFA whose rank-0 checkpoint holds the whole bank.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anomalib_mlff import MFFA, MLFF, FaissPatchcore
from anomalib_mlff.components.gaussian_stats import GaussianAccumulator
from anomalib_mlff.components.streaming_coreset import StreamingCoreset
from anomalib_mlff.data import EMBEDDED_ROOT
from tests import lightning_helpers as helpers
from tests.conftest import REPO_ROOT
from tests.ddp_fit import tiny

RATIO = 0.1


def shards() -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0's embeddings (uneven batches) and the Gaussian embeddings of its 5 images; rank 1 gets none."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(700, 16, generator=generator), torch.randn(5, 3, 2, 2, generator=generator, dtype=torch.float64)


def _rank(rank: int, init_file: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    embeddings, gaussian = shards()
    store = StreamingCoreset(RATIO, memory_budget_mb=0.2, seed=0, progress=False)  # 1638 rows: no reduction
    accumulator = GaussianAccumulator()
    if rank == 0:  # rank 1 sees no training image
        for batch in embeddings.split(300):
            store.append(batch)
        accumulator.update(gaussian)
    coreset = store.finish()
    accumulator.combine_ranks()
    torch.save({"coreset": coreset, "mean_cov": accumulator.mean_and_covariance()}, f"{results}.{rank}")
    dist.destroy_process_group()


def test_collectives_combine_uneven_and_empty_ranks(tmp_path: Path) -> None:
    results = str(tmp_path / "result")
    # fork: the ranks inherit the imported modules (a spawned rank would import anomalib again, ~30 s)
    mp.start_processes(_rank, args=(str(tmp_path / "init"), results), nprocs=2, join=True, start_method="fork")
    first, second = (torch.load(f"{results}.{rank}") for rank in (0, 1))
    assert torch.equal(first["coreset"], second["coreset"])  # the same coreset on every rank
    embeddings, gaussian = shards()
    single = StreamingCoreset(RATIO, memory_budget_mb=0.2, seed=0, progress=False)
    single.append(embeddings)
    assert torch.equal(first["coreset"], single.finish())  # rank 0 held everything: the single-process result
    alone = GaussianAccumulator()
    alone.update(gaussian)
    for rank_result in (first, second):
        for got, expected in zip(rank_result["mean_cov"], alone.mean_and_covariance(), strict=True):
            torch.testing.assert_close(got, expected)


def ddp_fit(model_name: str, tmp_path: Path, devices: int) -> Path:
    """Fit with ``devices`` gloo processes through Lightning's DDP launcher (tests/ddp_fit.py); the checkpoint."""
    checkpoint = tmp_path / f"{model_name}_{devices}.ckpt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(  # noqa: S603 - our interpreter and script
        [sys.executable, "-m", "tests.ddp_fit", model_name, str(EMBEDDED_ROOT / "brick"), str(checkpoint),
         str(devices)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(f"{checkpoint}.world").read_text() == str(devices)  # really ran on that many processes
    return checkpoint


@pytest.mark.slow
def test_ddp_faiss_patchcore_checkpoint_holds_the_whole_bank_and_scores_as_one_process(tmp_path: Path) -> None:
    """Coreset ratio 1: the 2-rank bank holds every training embedding, as one process's does, and scores the
    same: the same rows in another order give the same nearest neighbours, so the AUROCs agree to float noise."""
    model = FaissPatchcore.load_from_checkpoint(ddp_fit("faiss_patchcore", tmp_path, devices=2))
    data = helpers.datamodule(batch_size=8)
    single = tiny("faiss_patchcore")
    engine = helpers.quiet_engine(tmp_path / "single", enable_model_summary=False)
    engine.fit(single, datamodule=data)
    bank, expected = model.model.memory_bank, single.model.memory_bank
    assert bank.shape == expected.shape == (len(data.train_data) * (helpers.IMAGE_SIZE // 8) ** 2, 384)
    distances = torch.cdist(bank, expected, compute_mode="donot_use_mm_for_euclid_dist")
    assert float(distances.amin(dim=1).max()) < 1e-4  # the same rows, in another order
    ddp_scores = engine.test(model, datamodule=data, verbose=False)[0]
    single_scores = engine.test(single, datamodule=data, verbose=False)[0]
    for key in ("image_AUROC", "pixel_AUROC"):
        assert ddp_scores[key] == pytest.approx(single_scores[key], abs=1e-6), key


@pytest.mark.slow
def test_ddp_mffa_trains_psg_and_fills_the_whole_bank_and_the_gaussians(tmp_path: Path) -> None:
    checkpoint = ddp_fit("mffa", tmp_path, devices=2)
    model = MFFA.load_from_checkpoint(checkpoint)
    data = helpers.datamodule(batch_size=8)
    data.setup()
    patches = (helpers.IMAGE_SIZE // 8) ** 2
    assert model.model.nns.bank.memory_bank.shape[0] == int(len(data.train_data) * patches * 0.05)
    assert model.model.gaussian.is_fitted
    maps = helpers.predict_maps(model, helpers.pick_test_images(data, step=10, count=3))
    assert bool(torch.isfinite(maps).all())


def test_mlff_refuses_repeated_batches_under_ddp() -> None:
    """Only the first backward of a step is averaged by DDP: repeat > 1 would let the ranks drift apart."""
    model = helpers.tiny_model(MLFF, feature_dim=32, tem_levels=8, ptfem_levels=4, repeat=2)
    model._trainer = SimpleNamespace(world_size=2, datamodule=None)  # noqa: SLF001 - a trainer stand-in
    with pytest.raises(ValueError, match="repeat=2 cannot train on 2 DDP processes"):
        model.on_fit_start()
    model._trainer = SimpleNamespace(world_size=1, datamodule=None)  # noqa: SLF001
    model.on_fit_start()  # one process: repeated batches are fine
