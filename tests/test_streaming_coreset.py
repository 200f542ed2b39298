"""Bounded-memory fitting: the streaming coreset against the all-in-memory greedy, the Gaussian running sums
against anomalib's batch fit, and a budget too small for the coreset.
"""

from __future__ import annotations

import re

import pytest
import torch
from anomalib.models.components.stats import MultiVariateGaussian
from lightning.pytorch import seed_everything

from anomalib_mlff.components.coreset import greedy_coreset
from anomalib_mlff.components.gaussian_stats import GaussianAccumulator
from anomalib_mlff.components.streaming_coreset import StreamingCoreset
from anomalib_mlff.models.mffa.gaussian import GaussianBranch
from tests.test_coreset import coverage_radius, patch_embeddings, single_torch_thread  # noqa: F401 (fixture)

RATIO = 0.1
PATCHES_PER_IMAGE = 16 * 16  # 128 px, layer2 at stride 8


def stream(embeddings: torch.Tensor, budget_mb: float, seed: int | None = 0) -> tuple[torch.Tensor, StreamingCoreset]:
    """Feed ``embeddings`` image by image, as a training loop does; the coreset and the store (before finish)."""
    store = StreamingCoreset(RATIO, budget_mb, seed=seed, progress=False)
    peaks = []
    for batch in embeddings.split(PATCHES_PER_IMAGE):
        store.append(batch)
        peaks.append(len(store))
    state = {"capacity": store.capacity(embeddings.shape[1]), "reductions": store.reductions, "peak": max(peaks)}
    return store.finish(), state


def budget_for_rows(rows: int, dim: int) -> float:
    """The budget whose candidate buffer holds ``rows`` rows of width ``dim``."""
    return rows * 2 * 4 * dim / 2**20


def test_budget_holding_everything_gives_exactly_the_all_in_memory_coreset() -> None:
    embeddings = patch_embeddings()
    for seed in (0, None):
        seed_everything(1, verbose=False)  # seed=None draws from the torch and numpy RNGs
        coreset, state = stream(embeddings, budget_mb=1024, seed=seed)
        seed_everything(1, verbose=False)  # seed=None draws from the torch and numpy RNGs
        expected = embeddings[greedy_coreset(embeddings, RATIO, seed=seed, progress=False)]
        assert state["reductions"] == 0
        assert torch.equal(coreset, expected), seed


def test_streamed_coreset_stays_in_budget_and_covers_within_5_percent_of_the_greedy() -> None:
    embeddings = patch_embeddings()  # 30 images x 256 patches
    budget = budget_for_rows(len(embeddings) // 3 * 2, embeddings.shape[1])  # buffer: ~6.7x the coreset
    reference = coverage_radius(embeddings, greedy_coreset(embeddings, RATIO, seed=0, progress=False))
    ratios = []
    for seed in range(3):
        coreset, state = stream(embeddings, budget, seed=seed)
        assert state["reductions"] >= 1
        assert state["peak"] <= state["capacity"] < len(embeddings)
        assert coreset.shape == (int(len(embeddings) * RATIO), embeddings.shape[1])
        ratios.append(float(torch.cdist(embeddings, coreset).amin(dim=1).max()) / reference)
    assert sum(ratios) / len(ratios) <= 1.05, ratios


def test_streamed_coreset_is_deterministic_under_a_seed() -> None:
    embeddings = patch_embeddings()[: 10 * PATCHES_PER_IMAGE]
    budget = budget_for_rows(len(embeddings) // 3, embeddings.shape[1])
    first, state = stream(embeddings, budget, seed=3)
    second, _ = stream(embeddings, budget, seed=3)
    other, _ = stream(embeddings, budget, seed=4)
    assert state["reductions"] >= 2
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_budget_too_small_for_the_coreset_names_the_parameter_and_the_size_needed() -> None:
    embeddings = patch_embeddings()
    budget = budget_for_rows(len(embeddings) // 8, embeddings.shape[1])  # reductions to 1/16 < the 10% coreset
    with pytest.raises(ValueError, match="memory_budget_mb") as error:
        stream(embeddings, budget)
    needed = float(re.search(r"memory_budget_mb >= ([0-9]+\.[0-9])", str(error.value)).group(1))
    assert needed > budget
    coreset, _ = stream(embeddings, needed * 1.5)  # what it asks for, with the full set's coreset, is enough
    assert coreset.shape[0] == int(len(embeddings) * RATIO)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True])
def test_bad_budget_is_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="memory_budget_mb"):
        StreamingCoreset(RATIO, bad)


def test_gaussian_running_sums_equal_anomalibs_batch_fit() -> None:
    generator = torch.Generator().manual_seed(0)
    embeddings = 3.0 + torch.randn(23, 12, 4, 5, generator=generator) * torch.rand(12, 1, 1, generator=generator)
    expected = MultiVariateGaussian()
    expected.fit(embeddings)
    branch = GaussianBranch(in_channels=12, n_features=12, generator=torch.Generator().manual_seed(0))
    for batch in embeddings.split(5):  # uneven last batch
        branch.accumulate(batch)
    branch.finish()
    torch.testing.assert_close(branch.gaussian.mean, expected.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(branch.gaussian.inv_covariance, expected.inv_covariance, rtol=1e-4, atol=1e-4)


def test_gaussian_accumulator_covariance_is_torch_cov_in_float64() -> None:
    embeddings = torch.randn(9, 3, 2, 2, dtype=torch.float64)
    accumulator = GaussianAccumulator()
    for batch in embeddings.split(4):
        accumulator.update(batch)
    mean, covariance = accumulator.mean_and_covariance()
    vectors = embeddings.reshape(9, 3, 4)
    for position in range(4):
        torch.testing.assert_close(mean[position], vectors[:, :, position].mean(dim=0))
        torch.testing.assert_close(covariance[position], torch.cov(vectors[:, :, position].T))
