"""Greedy k-center coreset selection (PatchCore's minimax facility location), fast on CPU and GPU.

The greedy rule is PatchCore's (and anomalib's ``KCenterGreedy``): start from a random embedding,
which stays in the coreset (anomalib #3459), then repeatedly add the embedding farthest from all
chosen ones, measured after a Johnson-Lindenstrauss random projection (``eps=0.9``, as anomalib).

Two exact implementations of that rule, chosen by device:

* :func:`lazy_greedy` (CPU). Every step must find the point whose distance to its nearest centre
  is largest, but distances only shrink, so a block's last known maximum bounds it from above.
  Only the block with the largest bound is brought up to date, with all centres it has not seen
  in one matrix product, until the top block is current. Blocks stay in cache and the work is
  matrix-matrix, not one memory-bound pass over all points per step.
* :func:`dense_greedy` (GPU). One fused ``addmv`` + ``minimum`` + ``argmax`` per step over all
  points, with no host synchronisation; the GPU's memory bandwidth makes that the fast choice.

Both return the same selection (up to float ties) and are deterministic under a seed, together
with the selection's covering radius (the largest distance from any point to its nearest chosen
one, in the space the greedy measured) and the number of point-centre distances it evaluated:
:func:`greedy_selection` returns all three, so that a caller chaining selections (the streaming
coreset) can state and check its radius bound and count its work.

anomalib's ``KCenterGreedy`` implements the same rule with one dense pass per step and no radius;
the selections here are exact re-implementations of it (``seed=None`` reproduces its indices), not
a second rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
from anomalib.models.components.dimensionality_reduction import SparseRandomProjection
from sklearn.random_projection import johnson_lindenstrauss_min_dim
from tqdm.auto import tqdm

# Distortion allowed by the random projection, as anomalib's KCenterGreedy (SparseRandomProjection(eps=0.9)).
PROJECTION_EPS = 0.9
# Points per block in the lazy CPU greedy: a block's distances to a chunk of centres fit in L2 cache.
BLOCK_SIZE = 256
# Centres applied to a block per matrix product (bounds the temporary block x centres matrix).
CENTRE_CHUNK = 1024
# Seconds a selection runs before its progress bar appears (short runs stay quiet).
PROGRESS_DELAY_S = 2.0

__all__ = [
    "anomalib_projection",
    "coreset_size",
    "dense_greedy",
    "greedy_coreset",
    "greedy_coreset_of_size",
    "greedy_selection",
    "GreedySelection",
    "lazy_greedy",
    "random_projection",
    "validate_embeddings",
]


def validate_embeddings(embeddings: torch.Tensor, name: str = "embeddings") -> None:
    """Raise ``ValueError``/``TypeError`` naming ``name`` unless it is a finite, non-empty 2-D float tensor."""
    if not isinstance(embeddings, torch.Tensor):
        msg = f"{name} must be a torch.Tensor, got {type(embeddings).__name__}."
        raise TypeError(msg)
    if embeddings.ndim != 2:
        msg = f"{name} must be 2-D (count, dim), got shape {tuple(embeddings.shape)}."
        raise ValueError(msg)
    if embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        msg = f"{name} is empty (shape {tuple(embeddings.shape)}): nothing to build a memory bank from."
        raise ValueError(msg)
    if not embeddings.is_floating_point():
        msg = f"{name} must be a floating-point tensor, got dtype {embeddings.dtype}."
        raise TypeError(msg)
    if not bool(torch.isfinite(embeddings).all()):
        bad = int((~torch.isfinite(embeddings)).any(dim=1).sum())
        msg = f"{name} holds NaN or inf values in {bad} of {embeddings.shape[0]} rows."
        raise ValueError(msg)


def coreset_size(count: int, sampling_ratio: float) -> int:
    """Coreset size for ``count`` embeddings: ``int(count * sampling_ratio)`` as anomalib, at least 1."""
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, (int, float)):
        msg = f"sampling_ratio must be a number in (0, 1], got {sampling_ratio!r}."
        raise TypeError(msg)
    if not 0.0 < sampling_ratio <= 1.0:  # also rejects NaN
        msg = f"sampling_ratio must be in (0, 1], got {sampling_ratio}."
        raise ValueError(msg)
    return max(1, int(count * sampling_ratio))


def random_projection(embeddings: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Float32 Gaussian random projection to the Johnson-Lindenstrauss dimension (``eps=0.9``).

    The matrix is drawn on the CPU from ``generator`` (same result on every device). Embeddings
    already narrower than that dimension are returned as contiguous float32, unprojected.
    """
    count, dim = embeddings.shape
    target_dim = int(johnson_lindenstrauss_min_dim(count, eps=PROJECTION_EPS))
    if target_dim >= dim:
        return embeddings.float().contiguous()
    matrix = torch.randn(dim, target_dim, generator=generator) / math.sqrt(target_dim)
    return (embeddings.float() @ matrix.to(embeddings.device)).contiguous()


def anomalib_projection(embeddings: torch.Tensor) -> torch.Tensor:
    """anomalib's own sparse random projection (``eps=0.9``), drawn from the global RNGs, as float32."""
    projection = SparseRandomProjection(eps=PROJECTION_EPS).fit(embeddings)
    return projection.transform(embeddings).float().contiguous()


def greedy_coreset(
    embeddings: torch.Tensor,
    sampling_ratio: float,
    seed: int | None = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Indices of a greedy k-center coreset of ``embeddings``, the random start first.

    Args:
        embeddings: ``(count, dim)`` float tensor, on CPU or GPU.
        sampling_ratio: share of embeddings to keep, in (0, 1].
        seed: seeds the random projection and the start. ``None`` draws both from the global RNGs
            exactly as anomalib's ``KCenterGreedy`` does (its ``SparseRandomProjection`` and
            ``torch.randint``), so under the same ``seed_everything`` the coreset is anomalib's.
        progress: show a progress bar when the selection runs longer than a few seconds.

    Returns:
        ``int64`` tensor of ``int(count * sampling_ratio)`` (at least 1) distinct indices, on the
        embeddings' device. A ratio of 1 returns every index in order without running the greedy.
    """
    validate_embeddings(embeddings)
    return greedy_coreset_of_size(embeddings, coreset_size(embeddings.shape[0], sampling_ratio), seed, progress)


class GreedySelection(NamedTuple):
    """A greedy k-center selection with its covering radius and its cost."""

    #: ``int64`` indices of the chosen points, the start first, on the points' device.
    indices: torch.Tensor
    #: Largest distance from any point to its nearest chosen one, in the space the greedy measured
    #: (after the random projection unless ``project=False``); 0 when every point is chosen.
    radius: float
    #: Point-centre distances evaluated (the work, independent of the machine's speed).
    distances: int


def greedy_coreset_of_size(
    embeddings: torch.Tensor,
    size: int,
    seed: int | None = 0,
    progress: bool = True,
    project: bool = True,
) -> torch.Tensor:
    """Indices of a greedy k-center coreset of ``size`` (in ``[1, count]``) of valid ``embeddings``.

    As :func:`greedy_coreset`, with the size given instead of a ratio; :func:`greedy_selection`
    also returns the covering radius and the work.
    """
    return greedy_selection(embeddings, size, seed, progress, project).indices


def greedy_selection(
    embeddings: torch.Tensor,
    size: int,
    seed: int | None = 0,
    progress: bool = True,
    project: bool = True,
) -> GreedySelection:
    """Greedy k-center coreset of ``size`` (in ``[1, count]``) of valid ``embeddings``, with its radius and work.

    ``project=False`` measures exact distances instead of projected ones (slower on wide
    embeddings, no projected copy), so the radius is in the embeddings' own space: the streaming
    coreset's chunk reductions use it, so their error does not add the projection's distortion to
    the final pass's, and their radii bound the streamed coreset's.
    """
    count = embeddings.shape[0]
    if not 1 <= size <= count:
        msg = f"coreset size must be in [1, {count}] (the number of embeddings), got {size}."
        raise ValueError(msg)
    if size == count:
        return GreedySelection(torch.arange(count, device=embeddings.device), 0.0, 0)
    if seed is None:
        features = anomalib_projection(embeddings) if project else embeddings.float().contiguous()
        start = int(torch.randint(high=count, size=(1,), device=features.device))
    else:
        generator = torch.Generator().manual_seed(seed)
        features = random_projection(embeddings, generator) if project else embeddings.float().contiguous()
        start = int(torch.randint(count, (1,), generator=generator))
    if features.is_cuda:
        indices, radius_sq, distances = _dense_greedy(features, size, start, progress)
    else:
        with _one_torch_thread():
            indices, radius_sq, distances = _lazy_greedy(features, size, start, progress)
    return GreedySelection(indices, math.sqrt(max(radius_sq, 0.0)), distances)


def _progress(size: int, progress: bool) -> tqdm:
    return tqdm(total=size, desc="Greedy coreset", unit="pt", disable=not progress, delay=PROGRESS_DELAY_S)


def dense_greedy(features: torch.Tensor, size: int, start: int, progress: bool = False) -> torch.Tensor:
    """Greedy k-center on ``features`` with one pass over all points per step (the GPU path).

    Squared distances ``|x|^2 - 2 x.c + |c|^2`` come from one ``addmv``; the chosen index stays a
    device tensor, so the loop never waits for the GPU.
    """
    return _dense_greedy(features, size, start, progress)[0]


def _dense_greedy(features: torch.Tensor, size: int, start: int, progress: bool) -> tuple[torch.Tensor, float, int]:
    """Indices, squared covering radius and distances evaluated of the dense greedy."""
    count = features.shape[0]
    norms = features.square().sum(dim=1)
    min_sq = torch.full((count,), math.inf, device=features.device)
    sq = torch.empty_like(min_sq)
    selected = torch.empty(size, dtype=torch.long, device=features.device)
    index = torch.tensor([start], device=features.device)  # (1,): indexing with it never syncs
    with _progress(size, progress) as bar:
        for step in range(size):
            selected[step : step + 1] = index
            torch.addmv(norms, features, features.index_select(0, index).squeeze(0), alpha=-2, out=sq)
            sq += norms.index_select(0, index)
            torch.minimum(min_sq, sq, out=min_sq)
            min_sq.index_fill_(0, index, -math.inf)  # never chosen twice, even among duplicates
            index = torch.argmax(min_sq).unsqueeze(0)
            bar.update()
    # after the last step min_sq holds every point's distance to all chosen ones (chosen: -inf)
    return selected, float(min_sq.index_select(0, index)), count * size


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def lazy_greedy(features: torch.Tensor, size: int, start: int, progress: bool = False) -> torch.Tensor:
    """Greedy k-center on ``features`` updating only blocks that can hold the farthest point (the CPU path).

    Exact: a block is current when it has seen every chosen centre, and the next centre is taken
    only from a current block whose maximum is at least every other block's upper bound.
    Runs on one torch thread: each operation touches one small block, so thread start-up and
    barriers would cost more than they save (on a busy 2-core machine, 20x more).
    """
    with _one_torch_thread():
        return _lazy_greedy(features, size, start, progress)[0]


def _lazy_greedy(features: torch.Tensor, size: int, start: int, progress: bool) -> tuple[torch.Tensor, float, int]:
    """Indices, squared covering radius and distances evaluated of the lazy greedy.

    After the last step the loop has already brought the top block up to date with every centre
    (to pick the next point): its maximum is the covering radius.
    """
    count, dim = features.shape
    norms = features.square().sum(dim=1)
    min_sq = torch.full((count,), math.inf)
    centres = torch.empty(size, dim)
    centre_norms = torch.empty(size)
    num_blocks = -(-count // BLOCK_SIZE)
    seen = np.zeros(num_blocks, dtype=np.int64)  # centres already applied to each block
    bound = np.full(num_blocks, np.inf)  # upper bound on each block's largest squared distance
    selected = torch.empty(size, dtype=torch.long)
    index = start
    distances = 0
    with _progress(size, progress) as bar:
        for step in range(size):
            selected[step] = index
            centres[step] = features[index]
            centre_norms[step] = norms[index]
            min_sq[index] = -math.inf  # never chosen twice, even among duplicates
            while True:
                block = int(bound.argmax())
                if seen[block] == step + 1:
                    break
                bound[block] = _apply_centres(
                    features, norms, min_sq, block, centres, centre_norms, seen[block], step + 1
                )
                distances += min(BLOCK_SIZE, count - block * BLOCK_SIZE) * int(step + 1 - seen[block])
                seen[block] = step + 1
            first = block * BLOCK_SIZE
            index = first + int(min_sq[first : first + BLOCK_SIZE].argmax())
            bar.update()
    return selected, float(min_sq[index]), distances


def _apply_centres(
    features: torch.Tensor,
    norms: torch.Tensor,
    min_sq: torch.Tensor,
    block: int,
    centres: torch.Tensor,
    centre_norms: torch.Tensor,
    begin: int,
    end: int,
) -> float:
    """Lower ``min_sq`` of one block by its squared distances to ``centres[begin:end]``; return its new max."""
    rows = slice(block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE)
    block_features, block_min = features[rows], min_sq[rows]
    block_norms = norms[rows].unsqueeze(1)
    for first in range(begin, end, CENTRE_CHUNK):
        last = min(first + CENTRE_CHUNK, end)
        sq = torch.addmm(centre_norms[first:last], block_features, centres[first:last].T, alpha=-2)
        sq += block_norms
        torch.minimum(block_min, sq.amin(dim=1).clamp_min_(0), out=block_min)
    return float(block_min.max())
