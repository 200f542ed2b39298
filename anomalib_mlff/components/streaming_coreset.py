"""Greedy k-center coreset of a stream of embeddings, within a memory budget (and across DDP ranks).

PatchCore keeps a greedy k-center coreset of every training patch embedding; holding all of them
first makes the fit's memory grow with the training set, and one greedy pass over all of them
makes its time grow as (embeddings x coreset). :class:`StreamingCoreset` works chunk by chunk:

1. Embeddings fill a chunk of ``chunk_rows`` rows (8,192 by default). A full chunk is reduced
   on its own to ``ceil(oversampling x sampling_ratio x chunk)`` rows with the greedy k-center
   (:func:`greedy_selection`, exact distances) and the result joins the candidate pool. Each
   reduction costs ``chunk x reduced`` distances: the streaming work is linear in the number of
   embeddings and does not depend on the budget. Where ``oversampling x sampling_ratio >= 1``
   (PatchCore's ratio 0.1 with the default 10x) a chunk is kept whole.
2. When the pool would leave no room for the next chunk inside the budget, it is compacted: every
   segment of ``chunk_rows`` rows of it is reduced on its own to half (never below the coreset of
   what has been seen), and later chunks are reduced with half the oversampling. A budget whose
   pool holds ``oversampling`` coresets never compacts; one holding twice the coreset compacts a
   few times; below that (down to the coreset itself) the pool is trimmed at nearly every chunk.
3. :meth:`StreamingCoreset.finish` runs PatchCore's greedy (with its random projection) on the
   pool, selecting ``int(total * sampling_ratio)`` rows, the all-in-memory fit's size. Its work is
   ``oversampling x sampling_ratio`` of the all-in-memory greedy's.

Radius bound (composable k-center coresets, Indyk et al., PODS 2014; Malkomes et al., NeurIPS
2015): every dropped embedding lies within its reduction's covering radius of a kept row, so the
streamed coreset's covering radius is at most the final greedy's radius over the pool plus, for
every reduction level (chunk reductions, each compaction, the DDP gather), that level's largest
radius. :attr:`StreamingCoreset.report` states these radii after :meth:`finish`. Each greedy
reduction to ``m`` centres is within twice the optimal ``m``-center radius of its chunk, and with
``m`` ten times the chunk's share of the coreset that radius is far below the final one.

When no chunk is reduced and the pool is never compacted (``oversampling x sampling_ratio >= 1``
and a budget holding every embedding, or ``oversampling=None``) the result is exactly the
all-in-memory fit. :meth:`StreamingCoreset.check_budget` refuses, before any embedding, a budget
that cannot hold the coreset of a training set of known size.

Under DDP each rank streams its own shard; :meth:`StreamingCoreset.finish` reduces each rank's pool
to its share of the budget, gathers the pools, and rank 0's greedy choice is broadcast, so every
rank ends with the identical coreset.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .coreset import coreset_size, greedy_selection, validate_embeddings
from .distributed import broadcast_from_first, gather_rows, sum_across_ranks, world_size

logger = logging.getLogger(__name__)

__all__ = ["CHUNK_ROWS", "DEFAULT_MEMORY_BUDGET_MB", "DEFAULT_OVERSAMPLING", "StreamReport", "StreamingCoreset",
           "embedding_rows"]

#: Default candidate budget: holds ~350k 384-wide (resnet18) or ~87k 1536-wide (WideResNet-50) embeddings.
DEFAULT_MEMORY_BUDGET_MB = 1024.0
#: Rows per chunk reduced on its own: a chunk's greedy costs chunk x reduced distances, so the
#: streaming work per embedding is fixed; 8,192 rows of 384 floats are 12 MB.
CHUNK_ROWS = 8192
#: A chunk keeps this many times its share of the coreset (the radius bound's slack).
DEFAULT_OVERSAMPLING = 10.0
#: The budget covers the candidates and, as much again, the working memory of a greedy pass (the final pass's
#: random projection, the DDP gather) or of the buffer growing.
_COPIES = 2
#: Rows moved per step when the kept candidates are compacted to the front of the buffer.
_COMPACT_CHUNK = 4096
#: A chunk takes at most this share of the buffer, the pool the rest.
_CHUNKS_PER_BUFFER = 8


@dataclass
class StreamReport:
    """What one streamed selection did: its size, its work and the radii of its radius bound."""

    #: Embeddings streamed in (all ranks).
    seen: int = 0
    #: Chunk reductions and pool compactions run (this rank).
    reductions: int = 0
    #: Pool compactions run (this rank).
    compactions: int = 0
    #: Point-centre distances evaluated by this rank's chunk reductions and compactions (the streaming work).
    distances: int = 0
    #: Point-centre distances evaluated by the final greedy over the pool.
    final_distances: int = 0
    #: Largest covering radius of each reduction level: "chunks", "compaction 1", ..., "gather" (exact distances).
    level_radii: dict[str, float] = field(default_factory=dict)
    #: Covering radius of the final greedy over the pool, in the space it measured (after the random projection).
    final_radius: float = 0.0

    @property
    def added_radius(self) -> float:
        """What the reductions may add to the final pass's radius over the pool (sum of the levels' radii)."""
        return sum(self.level_radii.values())


class StreamingCoreset:
    """Bounded-memory embedding store whose :meth:`finish` returns the greedy k-center coreset.

    Args:
        sampling_ratio: share of all embeddings kept in the final coreset, in (0, 1].
        memory_budget_mb: memory for the candidates and their reduction; the buffer holds
            ``memory_budget_mb / (2 * 4 * dim)`` float32 rows (one chunk of them for the incoming one).
        seed: seeds each greedy selection (``None``: the global RNGs, as :func:`greedy_selection`).
        progress: progress bars for the streaming and the final selection.
        parameter: the name the budget has in the caller's API, used in error messages.
        oversampling: a chunk is reduced to this many times its share of the coreset; ``None`` keeps
            every chunk whole (the all-in-memory greedy while the budget holds every embedding).
        chunk_rows: rows per chunk (at most an eighth of the buffer).

    It has the list interface anomalib's ``PatchcoreModel.embedding_store`` is used with
    (``append``, ``clear``, ``len``), so PatchCore's own forward fills it.
    """

    def __init__(
        self,
        sampling_ratio: float,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
        seed: int | None = 0,
        progress: bool = True,
        parameter: str = "memory_budget_mb",
        oversampling: float | None = DEFAULT_OVERSAMPLING,
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        coreset_size(1, sampling_ratio)  # checks the ratio
        number = isinstance(memory_budget_mb, (int, float)) and not isinstance(memory_budget_mb, bool)
        if not number or not memory_budget_mb > 0:
            msg = f"{parameter} must be a positive number of MB, got {memory_budget_mb!r}."
            raise ValueError(msg)
        if oversampling is not None and not (isinstance(oversampling, (int, float)) and oversampling >= 1):
            msg = f"oversampling must be a number >= 1 or None, got {oversampling!r}."
            raise ValueError(msg)
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            msg = f"chunk_rows must be a positive integer, got {chunk_rows!r}."
            raise ValueError(msg)
        self.sampling_ratio = sampling_ratio
        self.memory_budget_mb = float(memory_budget_mb)
        self.seed = seed
        self.progress = progress
        self.parameter = parameter
        self.oversampling = oversampling
        self.chunk_rows = chunk_rows
        #: The last :meth:`finish`'s report (``None`` before one).
        self.last_report: StreamReport | None = None
        self.clear()

    # ------------------------------------------------------------------ state
    def clear(self) -> None:
        """Forget every embedding seen."""
        self._buffer: torch.Tensor | None = None
        self._capacity = 0  # most rows the budget allows, known from the first batch's width
        self._chunk = 0  # rows per chunk, known from the first batch's width
        self.pool = 0  # reduced candidates at the front of the buffer
        self.rows = 0  # candidates held: the pool and the chunk being filled
        self.seen = 0  # embeddings streamed in
        self.peak_rows = 0
        self._scale = math.inf if self.oversampling is None else float(self.oversampling)
        self.report = StreamReport()
        self._bar: tqdm | None = None

    @property
    def reductions(self) -> int:
        """Chunk reductions and pool compactions run so far."""
        return self.report.reductions

    def __len__(self) -> int:
        return self.rows

    def capacity(self, dim: int) -> int:
        """Candidate rows of width ``dim`` the budget allows."""
        return int(self.memory_budget_mb * 2**20) // (_COPIES * 4 * dim)

    def chunk_size(self, dim: int) -> int:
        """Rows of width ``dim`` per chunk: ``chunk_rows``, at most an eighth of the capacity."""
        return max(1, min(self.chunk_rows, self.capacity(dim) // _CHUNKS_PER_BUFFER))

    @property
    def candidates(self) -> torch.Tensor:
        """The candidate rows held now (a view)."""
        return self._buffer[: self.rows] if self._buffer is not None else torch.empty(0, 0)

    # ------------------------------------------------------------------ budget
    def _budget_holds(self, capacity: int, total_rows: int, ranks: int, comfortable: bool = False) -> bool:
        """Whether a buffer of ``capacity`` rows holds the coreset of ``total_rows`` rows over ``ranks`` ranks.

        The pool (the buffer less one chunk) must hold each rank's coreset, and under DDP each rank's
        share of the gathered pools must too. ``comfortable``: the pool holds twice the coreset, so a
        compaction halves it (a few compactions in all) instead of trimming it at every chunk.
        """
        chunk = max(1, min(self.chunk_rows, capacity // _CHUNKS_PER_BUFFER))
        pool = capacity - chunk
        per_rank = math.ceil(self.sampling_ratio * math.ceil(total_rows / ranks))
        share = pool if ranks == 1 else capacity // ranks
        return capacity >= 4 and per_rank <= (pool // 2 if comfortable else pool) and per_rank <= share  # noqa: PLR2004

    def required_budget_mb(self, total_rows: int, dim: int, ranks: int = 1, comfortable: bool = False) -> float:
        """Smallest budget (MB) holding the coreset of ``total_rows`` embeddings of width ``dim`` on ``ranks`` ranks.

        ``comfortable``: the smallest budget in which the fit compacts its pool only a few times (twice the
        coreset); below it and above the minimum the fit finishes, with more work.
        """
        size = coreset_size(total_rows, self.sampling_ratio)
        low, high = 4, 4 * size + 2 * _CHUNKS_PER_BUFFER * self.chunk_rows + 4
        while low < high:  # the condition is monotone in the capacity
            middle = (low + high) // 2
            if self._budget_holds(middle, total_rows, ranks, comfortable):
                high = middle
            else:
                low = middle + 1
        return math.ceil(low * _COPIES * 4 * dim / 2**20 * 10) / 10  # rounded up to 0.1 MB

    def check_budget(self, total_rows: int, dim: int, ranks: int = 1) -> None:
        """Raise ``ValueError`` naming the budget parameter unless it holds the coreset of ``total_rows`` rows.

        Called before any embedding with the training set's size (images x patches per image), so a
        fit that cannot finish stops at once. A budget above the minimum but below the comfortable
        one (see :meth:`required_budget_mb`) is accepted with a warning: the fit then trims its pool
        at nearly every chunk, which costs time that grows with the budget.
        """
        if not self._budget_holds(self.capacity(dim), total_rows, ranks):
            self._raise_budget(total_rows, dim, ranks, what=f"the {total_rows} training embeddings")
        if not self._budget_holds(self.capacity(dim), total_rows, ranks, comfortable=True):
            logger.warning(
                "%s=%g holds the coreset of the %d training embeddings only just: the fit will compact its "
                "candidates often and run slower; %s >= %.1f avoids that.",
                self.parameter, self.memory_budget_mb, total_rows, self.parameter,
                self.required_budget_mb(total_rows, dim, ranks, comfortable=True),
            )

    def _raise_budget(self, rows: int, dim: int, ranks: int = 1, what: str | None = None) -> None:
        size = coreset_size(rows, self.sampling_ratio)
        needed = self.required_budget_mb(rows, dim, ranks)
        what = what or f"the {rows} embeddings seen so far"
        msg = (
            f"{self.parameter}={self.memory_budget_mb:g} is too small: the coreset of {what} (dimension {dim}) has "
            f"{size} rows at sampling ratio {self.sampling_ratio}, which needs {self.parameter} >= {needed:.1f}"
            + (f" with {ranks} ranks" if ranks > 1 else "")
            + ". Raise it or lower the sampling ratio."
        )
        raise ValueError(msg)

    # ------------------------------------------------------------------ streaming
    def append(self, embeddings: torch.Tensor) -> None:
        """Add ``(count, dim)`` embeddings, reducing each full chunk and compacting the pool when needed."""
        validate_embeddings(embeddings)
        embeddings = embeddings.detach()
        if self._buffer is None:
            self._allocate(embeddings)
        elif embeddings.shape[1] != self._buffer.shape[1]:
            msg = f"embeddings have dimension {embeddings.shape[1]}, earlier ones {self._buffer.shape[1]}."
            raise ValueError(msg)
        start = 0
        while start < embeddings.shape[0]:
            take = min(self._chunk - (self.rows - self.pool), embeddings.shape[0] - start)
            self._reserve(self.rows + take)
            self._buffer[self.rows : self.rows + take] = embeddings[start : start + take]
            self.rows += take
            self.seen += take
            start += take
            self.peak_rows = max(self.peak_rows, self.rows)
            if self.rows - self.pool == self._chunk:
                self._close_chunk()
        if self._bar is None:
            self._bar = tqdm(desc="Streaming embeddings", unit="emb", disable=not self.progress, delay=2.0)
        self._bar.update(embeddings.shape[0])

    def _allocate(self, embeddings: torch.Tensor) -> None:
        dim = embeddings.shape[1]
        self._capacity = self.capacity(dim)
        self._chunk = self.chunk_size(dim)
        if self._capacity < 4:  # noqa: PLR2004 - a chunk and a pool of at least two rows
            self._raise_budget(max(self.seen, embeddings.shape[0]), dim)
        self._buffer = embeddings.new_empty(min(self._capacity, embeddings.shape[0]), dim)

    def _reserve(self, rows: int) -> None:
        """Grow the buffer (doubling, at most to the capacity) to hold ``rows``: a small set never takes the budget."""
        if rows <= self._buffer.shape[0]:
            return
        size = min(self._capacity, max(rows, 2 * self._buffer.shape[0]))
        grown = self._buffer.new_empty(size, self._buffer.shape[1])
        grown[: self.rows] = self._buffer[: self.rows]
        self._buffer = grown

    def _close_chunk(self, last: bool = False) -> None:
        """Reduce the chunk being filled into the pool, then (unless ``last``) compact the pool until a chunk fits."""
        count = self.rows - self.pool
        if count:
            share = self._scale * self.sampling_ratio * count
            target = count if share >= count else math.ceil(share)
            self.pool += self._select(self.pool, self.rows, target, self.pool, "chunks")
            self.rows = self.pool
        while not last and self.pool + self._chunk > self._capacity:
            needed = math.ceil(self.sampling_ratio * self.seen)
            self._reduce(max(self.pool // 2, needed))
            self._scale = max(1.0, self._scale / 2)

    def _select(self, begin: int, end: int, target: int, destination: int, level: str) -> int:
        """Keep the greedy ``target`` of buffer rows ``[begin, end)``, moved to ``destination <= begin``; rows kept."""
        count = end - begin
        if target >= count:
            if destination != begin:
                self._buffer[destination : destination + count] = self._buffer[begin:end].clone()
            return count
        seed = None if self.seed is None else self.seed + 1 + self.report.reductions
        selection = greedy_selection(self._buffer[begin:end], target, seed=seed, progress=False, project=False)
        self.report.reductions += 1
        self.report.distances += selection.distances
        self.report.level_radii[level] = max(self.report.level_radii.get(level, 0.0), selection.radius)
        # Sorted, each kept row moves to a position at or before its own, so steps never overwrite
        # a row still to be moved and no second buffer is needed.
        indices = selection.indices.sort().values + begin
        for first in range(0, target, _COMPACT_CHUNK):
            step = indices[first : first + _COMPACT_CHUNK]
            self._buffer[destination + first : destination + first + len(step)] = self._buffer.index_select(0, step)
        return target

    def _reduce(self, target: int, level: str | None = None) -> None:
        """Compact the pool to about ``target`` rows, each segment of ``chunk_rows`` reduced on its own, in proportion.

        Segments of the fixed ``chunk_rows`` (not the budget's) keep a compaction's work per row
        independent of the budget.
        """
        if target < math.ceil(self.sampling_ratio * self.seen) or target >= self.pool:
            self._raise_budget(self.seen, self._buffer.shape[1])
        self.report.compactions += 1
        level = level or f"compaction {self.report.compactions}"
        kept, pool = 0, self.pool
        for begin in range(0, pool, self.chunk_rows):
            end = min(begin + self.chunk_rows, pool)
            share = max(1, math.ceil(target * (end - begin) / pool))
            kept += self._select(begin, end, min(share, end - begin), kept, level)
        self.pool = self.rows = kept

    # ------------------------------------------------------------------ result
    def finish(self, device: torch.device | None = None) -> torch.Tensor:
        """The coreset of every embedding streamed in (on every rank, under DDP); clears the store.

        ``device``: where an empty rank's placeholder lives (the collectives' device); default CPU.
        :attr:`last_report` then holds the selection's work and radii.
        """
        if self._bar is not None:
            self._bar.close()
        ranks = world_size()
        total = int(sum_across_ranks(torch.tensor([self.seen], device=device or self.candidates.device))[0])
        if total == 0:
            msg = "No embeddings to build a memory bank from: the training set produced none."
            raise ValueError(msg)
        if self._buffer is not None and self.rows > self.pool:
            self._close_chunk(last=True)  # the last, partial chunk, reduced as every other
        if ranks > 1:
            self._reduce_for_gather(ranks)
            local = self.candidates.clone() if self.rows else torch.empty(0, 0, device=device)
            self._buffer = None  # the gathered pools take its place in the budget
            candidates = gather_rows(local)
            del local
        else:
            candidates = self.candidates
        size = coreset_size(total, self.sampling_ratio)
        if size > candidates.shape[0]:  # only after reductions: the gathered candidates cannot hold the coreset
            self._raise_budget(total, candidates.shape[1], ranks)
        selection = greedy_selection(candidates, size, seed=self.seed, progress=self.progress)
        indices = broadcast_from_first(selection.indices.contiguous())
        coreset = candidates[indices].clone()
        report = self.report
        report.seen, report.final_radius = total, selection.radius
        report.final_distances = selection.distances
        self.clear()
        self.last_report = report
        return coreset

    def _reduce_for_gather(self, ranks: int) -> None:
        """Reduce this rank's pool to its share of the buffer, so that all ranks' pools together fit the budget."""
        if self._buffer is None:
            return
        share = self._capacity // ranks
        if self.pool > share:
            if math.ceil(self.sampling_ratio * self.seen) > share:
                self._raise_budget(self.seen * ranks, self._buffer.shape[1], ranks)
            self._reduce(share, level="gather")


def embedding_rows(
    module: nn.Module, embed: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor
) -> tuple[int, int]:
    """Rows per image and width of ``embed(image)``, a ``(1, dim, h, w)`` embedding of one ``(1, C, H, W)`` image.

    Runs ``module`` in eval mode without gradients (BatchNorm statistics untouched) and restores every
    submodule's mode, so a model can size its training set's embeddings before embedding any of it.
    """
    modes = {sub: sub.training for sub in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            embedding = embed(image)
    finally:
        for sub, training in modes.items():
            sub.training = training
    return embedding.shape[-2] * embedding.shape[-1], embedding.shape[1]
