"""Bounded-memory fitting: the streaming coreset against the all-in-memory greedy, the Gaussian running sums
against anomalib's batch fit, and a budget too small for the coreset.
"""

from __future__ import annotations

import re

import pytest
import torch
from anomalib.models.components.stats import MultiVariateGaussian
from lightning.pytorch import seed_everything

from anomalib_mlff.components.coreset import _dense_greedy, _lazy_greedy, greedy_coreset, greedy_selection
from anomalib_mlff.components.gaussian_stats import GaussianAccumulator
from anomalib_mlff.components.streaming_coreset import DEFAULT_OVERSAMPLING, StreamingCoreset, StreamReport
from anomalib_mlff.models.mffa.gaussian import GaussianBranch
from tests.test_coreset import coverage_radius, patch_embeddings, single_torch_thread  # noqa: F401 (fixture)

RATIO = 0.1
PATCHES_PER_IMAGE = 16 * 16  # 128 px, layer2 at stride 8


def stream(
    embeddings: torch.Tensor, budget_mb: float, seed: int | None = 0, check: bool = False
) -> tuple[torch.Tensor, dict]:
    """Feed ``embeddings`` image by image, as a training loop does; the coreset and the store's state.

    ``check``: first check the budget against the whole set's size, as the models do before a fit.
    """
    store = StreamingCoreset(RATIO, budget_mb, seed=seed, progress=False)
    if check:
        store.check_budget(*embeddings.shape)
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
    budget = budget_for_rows(len(embeddings) // 16, embeddings.shape[1])  # a buffer of 1/16 < the 10% coreset
    with pytest.raises(ValueError, match="memory_budget_mb") as error:
        stream(embeddings, budget, check=True)  # refused before the first embedding
    needed = float(re.search(r"memory_budget_mb >= ([0-9]+\.[0-9])", str(error.value)).group(1))
    assert needed > budget
    assert f"the {len(embeddings)} training embeddings" in str(error.value)
    with pytest.raises(ValueError, match=r"memory_budget_mb >= [0-9]+\.[0-9]"):
        stream(embeddings, budget)  # unchecked, the stream itself stops once the coreset outgrows the pool
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


def clustered_points(count: int, seed: int = 0, dim: int = 32, clusters: int = 40) -> torch.Tensor:
    """A fixed random clustered set: Gaussian clusters of random widths around random centres."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator) * 4
    widths = 0.3 + torch.rand(clusters, 1, generator=generator)
    labels = torch.randint(clusters, (count,), generator=generator)
    return centres[labels] + torch.randn(count, dim, generator=generator) * widths[labels]


def streamed(points: torch.Tensor, ratio: float, budget_mb: float, seed: int = 0, chunk_rows: int = 2048
             ) -> tuple[torch.Tensor, torch.Tensor, StreamReport]:
    """The streamed coreset of ``points`` fed 256 rows at a time, the pool it was chosen from, and the report."""
    store = StreamingCoreset(ratio, budget_mb, seed=seed, progress=False, chunk_rows=chunk_rows)
    for batch in points.split(256):
        store.append(batch)
    store._close_chunk(last=True)  # noqa: SLF001 - the pool finish() chooses from, for the bound
    pool = store.candidates.clone()
    return store.finish(), pool, store.last_report


def radius(points: torch.Tensor, coreset: torch.Tensor) -> float:
    return max(float(torch.cdist(chunk, coreset).amin(dim=1).max()) for chunk in points.split(4096))


@pytest.mark.parametrize("ratio", [0.01, 0.1])
def test_streamed_radius_is_within_its_stated_bound_on_a_clustered_set(ratio: float) -> None:
    """Final greedy's radius over the pool (measured exactly) plus each reduction level's radius bounds it."""
    points = clustered_points(16384)
    budget = budget_for_rows(len(points) // 2, points.shape[1])  # ratio 0.1: the pool compacts
    for seed in range(2):
        coreset, pool, report = streamed(points, ratio, budget, seed=seed)
        assert coreset.shape[0] == int(len(points) * ratio)
        assert report.reductions >= 1 and report.level_radii
        assert radius(points, coreset) <= radius(pool, coreset) + report.added_radius + 1e-5


def test_streamed_radius_through_chunk_reductions_is_within_5_percent_on_patchcore_embeddings() -> None:
    """Chunks reduced on their own (8 chunks, no compaction), PatchCore embeddings: mean radius within 5%."""
    embeddings = patch_embeddings()
    ratio = 0.05
    reference = radius(embeddings, embeddings[greedy_coreset(embeddings, ratio, seed=0, progress=False)])
    ratios = []
    for seed in range(3):
        coreset, _, report = streamed(embeddings, ratio, 1024, seed=seed, chunk_rows=1024)
        assert report.reductions >= 7 and report.compactions == 0
        ratios.append(radius(embeddings, coreset) / reference)
    assert sum(ratios) / len(ratios) <= 1.05, ratios


def test_greedy_selection_reports_its_exact_covering_radius() -> None:
    points = clustered_points(3000, seed=1)
    for project in (False, True):
        selection = greedy_selection(points, 50, seed=0, progress=False, project=project)
        if not project:  # exact distances: the radius is the measured one
            assert selection.radius == pytest.approx(radius(points, points[selection.indices]), rel=1e-4)
        assert 0 < selection.distances <= len(points) * 50
    dense = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    lazy, radius_sq, _ = _lazy_greedy(dense, 40, 3, progress=False)
    _, dense_sq, dense_work = _dense_greedy(dense, 40, 3, progress=False)
    assert radius_sq == pytest.approx(dense_sq, rel=1e-4)
    assert dense_work == 500 * 40


def test_streaming_work_is_linear_in_the_points_and_does_not_grow_with_the_budget() -> None:
    """Distances counted, not seconds: each chunk's reduction costs the same, whatever the budget."""
    ratio, chunk = 0.01, 2048
    small, large = clustered_points(8 * chunk), clustered_points(16 * chunk)
    budget = budget_for_rows(16 * chunk, small.shape[1])
    _, _, once = streamed(small, ratio, budget)
    _, _, twice = streamed(large, ratio, budget)
    assert once.compactions == twice.compactions == 0
    assert 1.8 <= twice.distances / once.distances <= 2.2
    # the final pass chooses from the oversampled pool only: a tenth of the points at ratio 0.01
    assert twice.final_distances <= int(len(large) * ratio) * len(large) * DEFAULT_OVERSAMPLING * ratio * 1.1
    works = [streamed(large, ratio, budget * factor)[2] for factor in (1, 4, 16)]
    for report in works[1:]:
        assert report.distances + report.final_distances <= works[0].distances + works[0].final_distances


def test_budget_check_refuses_only_what_cannot_hold_the_coreset() -> None:
    store = StreamingCoreset(0.1, memory_budget_mb=64, progress=False)
    store.check_budget(100_000, 384)  # 10,000 coreset rows in a pool of ~19,000
    with pytest.raises(ValueError, match=r"memory_budget_mb=64 is too small.*memory_budget_mb >= "):
        store.check_budget(400_000, 384)
    needed = store.required_budget_mb(400_000, 384)
    StreamingCoreset(0.1, memory_budget_mb=needed, progress=False).check_budget(400_000, 384)
    assert store.required_budget_mb(400_000, 384, comfortable=True) > needed
    with pytest.raises(ValueError, match="with 2 ranks"):
        StreamingCoreset(0.1, memory_budget_mb=needed / 4, progress=False).check_budget(400_000, 384, ranks=2)


def test_without_oversampling_a_budget_holding_everything_gives_the_all_in_memory_coreset_at_any_ratio() -> None:
    points = clustered_points(5000, seed=2)
    for seed in (0, None):
        seed_everything(1, verbose=False)
        store = StreamingCoreset(0.01, 64, seed=seed, progress=False, oversampling=None, chunk_rows=1024)
        for batch in points.split(256):
            store.append(batch)
        coreset = store.finish()
        seed_everything(1, verbose=False)
        assert store.last_report.reductions == 0
        assert torch.equal(coreset, points[greedy_coreset(points, 0.01, seed=seed, progress=False)]), seed
    chunked = StreamingCoreset(0.01, 64, seed=0, progress=False, chunk_rows=1024)
    for batch in points.split(256):
        chunked.append(batch)
    chunked.finish()
    assert chunked.last_report.reductions >= 4  # the default oversampling reduces each chunk
