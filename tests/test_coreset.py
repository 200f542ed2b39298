"""Greedy k-center coreset: the greedy rule itself, coverage against anomalib's KCenterGreedy, bad input.

"Real" embeddings here are PatchCore's (pooled resnet18 layer2+layer3, concatenated) of the
embedded brick images with a randomly initialised backbone: ImageNet weights cannot be
downloaded offline.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

import pytest
import torch
from anomalib.data.utils import read_image
from anomalib.models import Patchcore
from anomalib.models.components import KCenterGreedy
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from lightning.pytorch import seed_everything

from anomalib_mlff.components import greedy_coreset
from anomalib_mlff.components.coreset import dense_greedy, lazy_greedy, random_projection
from anomalib_mlff.data import EMBEDDED_ROOT


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread() -> Iterator[None]:
    """Run these small tests on one torch thread: on a shared 2-core machine threads only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@cache
def patch_embeddings(folder: str = "train", count: int = 30, size: int = 128) -> torch.Tensor:
    """PatchCore embeddings of the first ``count`` brick images under ``folder`` (random-init resnet18)."""
    paths = sorted((EMBEDDED_ROOT / "brick" / folder).rglob("*.png"))[:count]
    images = torch.stack([read_image(path, as_tensor=True) for path in paths])
    images = Patchcore.configure_pre_processor(image_size=(size, size)).transform(images)
    torch.manual_seed(0)
    model = PatchcoreModel(layers=["layer2", "layer3"], backbone="resnet18", pre_trained=False).train()
    with torch.no_grad():
        return model(images)


def coverage_radius(embeddings: torch.Tensor, indices: torch.Tensor) -> float:
    """Largest distance from any embedding to its nearest coreset member, in the original space."""
    return float(torch.cdist(embeddings, embeddings[indices]).amin(dim=1).max())


@pytest.mark.slow  # three runs of anomalib's KCenterGreedy on PatchCore embeddings
def test_coverage_radius_within_5_percent_of_kcenter_greedy() -> None:
    embeddings = patch_embeddings()
    ratios = []
    for seed in range(3):
        torch.manual_seed(seed)
        reference = torch.tensor(KCenterGreedy(embedding=embeddings, sampling_ratio=0.1).select_coreset_idxs())
        ours = greedy_coreset(embeddings, 0.1, seed=seed, progress=False)
        assert len(ours) == len(reference) == int(len(embeddings) * 0.1)
        ratios.append(coverage_radius(embeddings, ours) / coverage_radius(embeddings, reference))
    assert max(ratios) <= 1.05, ratios


def test_each_step_adds_the_point_farthest_from_the_chosen_ones() -> None:
    """The greedy rule, checked step by step against a brute-force reference (no projection at 16 dims)."""
    points = torch.randn(400, 16, generator=torch.Generator().manual_seed(1))
    chosen = greedy_coreset(points, 0.1, seed=3, progress=False)
    assert torch.equal(random_projection(points, torch.Generator()), points)  # 16 dims: nothing to project
    for step in range(1, len(chosen)):
        nearest = torch.cdist(points, points[chosen[:step]]).amin(dim=1)
        assert nearest[chosen[step]] == pytest.approx(float(nearest.max()), rel=1e-5)


def test_lazy_cpu_and_dense_gpu_algorithms_choose_the_same_points() -> None:
    gaussian = torch.randn(3000, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lazy_greedy(gaussian, 300, start=5), dense_greedy(gaussian, 300, start=5))
    # real embeddings have near-ties that float rounding may order differently: compare coverage
    embeddings = patch_embeddings()
    features = random_projection(embeddings, torch.Generator().manual_seed(0))
    lazy, dense = lazy_greedy(features, 768, start=7), dense_greedy(features, 768, start=7)
    assert lazy[0] == dense[0] == 7
    assert len(set(lazy.tolist()) & set(dense.tolist())) >= 0.95 * 768
    assert coverage_radius(embeddings, lazy) == pytest.approx(coverage_radius(embeddings, dense), rel=1e-3)


def test_deterministic_under_a_seed_and_the_random_start_comes_first() -> None:
    embeddings = patch_embeddings()
    first = greedy_coreset(embeddings, 0.05, seed=11, progress=False)
    assert torch.equal(first, greedy_coreset(embeddings, 0.05, seed=11, progress=False))
    starts = {int(greedy_coreset(embeddings, 0.05, seed=seed, progress=False)[0]) for seed in range(4)}
    assert len(starts) == 4  # the start is random, and it is kept in the coreset


def test_indices_are_distinct_even_with_duplicate_embeddings() -> None:
    distinct = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    embeddings = distinct.repeat(40, 1)  # 200 rows, 5 distinct values
    chosen = greedy_coreset(embeddings, 0.25, progress=False)
    assert len(chosen) == 50
    assert len(set(chosen.tolist())) == 50
    assert len({tuple(row) for row in embeddings[chosen[:5]].tolist()}) == 5  # the 5 values come first


def test_ratio_one_keeps_everything_and_tiny_ratios_keep_one() -> None:
    embeddings = torch.randn(50, 4)
    assert torch.equal(greedy_coreset(embeddings, 1.0), torch.arange(50))
    assert len(greedy_coreset(embeddings, 0.001)) == 1


@pytest.mark.parametrize(
    ("embeddings", "ratio", "error", "match"),
    [
        (torch.empty(0, 8), 0.1, ValueError, "embeddings is empty"),
        (torch.empty(8, 0), 0.1, ValueError, "embeddings is empty"),
        (torch.randn(8), 0.1, ValueError, "embeddings must be 2-D"),
        (torch.ones(8, 4, dtype=torch.int64), 0.1, TypeError, "floating-point"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 0.5, ValueError, "NaN or inf values in 1 of 2 rows"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 0.5, ValueError, "NaN or inf"),
        (torch.randn(8, 4), 0.0, ValueError, r"sampling_ratio must be in \(0, 1\]"),
        (torch.randn(8, 4), -0.5, ValueError, "sampling_ratio"),
        (torch.randn(8, 4), 1.5, ValueError, "sampling_ratio"),
        (torch.randn(8, 4), float("nan"), ValueError, "sampling_ratio"),
        (torch.randn(8, 4), True, TypeError, "sampling_ratio"),
    ],
)
def test_bad_input_is_a_clear_error(embeddings: torch.Tensor, ratio: float, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        greedy_coreset(embeddings, ratio)


def test_seed_none_selects_anomalibs_kcentergreedy_coreset() -> None:
    """With the global RNGs in the same state, ``seed=None`` picks anomalib's indices in anomalib's order."""
    embeddings = patch_embeddings()
    seed_everything(3, verbose=False)
    expected = KCenterGreedy(embeddings, 0.05).select_coreset_idxs()
    seed_everything(3, verbose=False)
    assert greedy_coreset(embeddings, 0.05, seed=None).tolist() == expected
