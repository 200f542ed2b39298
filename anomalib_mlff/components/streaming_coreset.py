"""Greedy k-center coreset of a stream of embeddings, within a memory budget (and across DDP ranks).

PatchCore keeps a greedy k-center coreset of every training patch embedding; holding all of them
first makes the fit's memory grow with the training set. :class:`StreamingCoreset` keeps a
candidate buffer of at most ``capacity`` rows instead. When a batch would overflow it, the buffer
is reduced to ``capacity // 2`` rows with the same greedy k-center (:func:`greedy_coreset`) and
filling goes on; at the end one greedy pass over the candidates picks the coreset, whose size,
``int(total * sampling_ratio)``, is that of the all-in-memory fit.

Approximation (composable k-center coresets, Malkomes et al., NeurIPS 2015; Indyk et al., PODS
2014): a dropped embedding lies within a reduction's coverage radius of a kept candidate, so the
final coverage radius is at most the final greedy radius plus the radii of the reductions it went
through, and each greedy reduction to ``m >= k`` centres is within twice the optimal ``m``-center
radius of what it reduced. Reductions measure exact distances (no random projection), so their
error is not compounded by the projection's distortion; the final pass is PatchCore's.

With reductions far larger than the coreset the added radius is small (with a buffer of about 5x the
coreset, ``tests/test_streaming_coreset.py`` checks the radius within 5% of the all-in-memory
greedy on PatchCore embeddings; at 3x it was 2-9% larger). When the budget holds every embedding
no reduction runs and the result is exactly the all-in-memory fit.

Under DDP each rank streams its own shard; :meth:`StreamingCoreset.finish` reduces each rank's candidates to
``capacity // world_size``, gathers them, and rank 0's greedy choice is broadcast, so every rank ends with the
identical coreset.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .coreset import coreset_size, greedy_coreset_of_size, validate_embeddings
from .distributed import broadcast_from_first, gather_rows, sum_across_ranks, world_size

__all__ = ["DEFAULT_MEMORY_BUDGET_MB", "StreamingCoreset"]

#: Default candidate budget: holds ~350k 384-wide (resnet18) or ~87k 1536-wide (WideResNet-50) embeddings.
DEFAULT_MEMORY_BUDGET_MB = 1024.0
#: The budget covers the candidates and, as much again, the working memory of a greedy pass (the final pass's
#: random projection) or of the buffer growing.
_COPIES = 2
#: Rows moved per step when the kept candidates are compacted to the front of the buffer.
_COMPACT_CHUNK = 4096


class StreamingCoreset:
    """Bounded-memory embedding store whose :meth:`finish` returns the greedy k-center coreset.

    Args:
        sampling_ratio: share of all embeddings kept in the final coreset, in (0, 1].
        memory_budget_mb: memory for the candidates and their reduction; the candidate buffer holds
            ``memory_budget_mb / (2 * 4 * dim)`` float32 rows.
        seed: seeds each greedy selection (``None``: the global RNGs, as :func:`greedy_coreset`).
        progress: progress bars for the streaming reductions and the final selection.
        parameter: the name the budget has in the caller's API, used in error messages.

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
    ) -> None:
        coreset_size(1, sampling_ratio)  # checks the ratio
        number = isinstance(memory_budget_mb, (int, float)) and not isinstance(memory_budget_mb, bool)
        if not number or not memory_budget_mb > 0:
            msg = f"{parameter} must be a positive number of MB, got {memory_budget_mb!r}."
            raise ValueError(msg)
        self.sampling_ratio = sampling_ratio
        self.memory_budget_mb = float(memory_budget_mb)
        self.seed = seed
        self.progress = progress
        self.parameter = parameter
        self.clear()

    # ------------------------------------------------------------------ state
    def clear(self) -> None:
        """Forget every embedding seen."""
        self._buffer: torch.Tensor | None = None
        self._capacity = 0  # most rows the budget allows, known from the first batch's width
        self.rows = 0  # candidates held
        self.seen = 0  # embeddings streamed in
        self.reductions = 0
        self.peak_rows = 0
        self._bar: tqdm | None = None

    def __len__(self) -> int:
        return self.rows

    def capacity(self, dim: int) -> int:
        """Candidate rows of width ``dim`` the budget allows."""
        return int(self.memory_budget_mb * 2**20) // (_COPIES * 4 * dim)

    @property
    def candidates(self) -> torch.Tensor:
        """The candidate rows held now (a view)."""
        return self._buffer[: self.rows] if self._buffer is not None else torch.empty(0, 0)

    # ------------------------------------------------------------------ streaming
    def append(self, embeddings: torch.Tensor) -> None:
        """Add ``(count, dim)`` embeddings, reducing the candidates whenever the budget is reached."""
        validate_embeddings(embeddings)
        embeddings = embeddings.detach()
        if self._buffer is None:
            self._allocate(embeddings)
        elif embeddings.shape[1] != self._buffer.shape[1]:
            msg = f"embeddings have dimension {embeddings.shape[1]}, earlier ones {self._buffer.shape[1]}."
            raise ValueError(msg)
        capacity = self._capacity
        start = 0
        while start < embeddings.shape[0]:
            if self.rows == capacity:
                self._reduce(capacity // 2)
            stop = start + min(capacity - self.rows, embeddings.shape[0] - start)
            self._reserve(self.rows + stop - start)
            self._buffer[self.rows : self.rows + stop - start] = embeddings[start:stop]
            self.rows += stop - start
            self.seen += stop - start
            start = stop
        self.peak_rows = max(self.peak_rows, self.rows)
        if self._bar is None:
            self._bar = tqdm(desc="Streaming embeddings", unit="emb", disable=not self.progress, delay=2.0)
        self._bar.update(embeddings.shape[0])

    def _allocate(self, embeddings: torch.Tensor) -> None:
        dim = embeddings.shape[1]
        self._capacity = self.capacity(dim)
        if self._capacity < 2:  # noqa: PLR2004 - a reduction keeps half
            self._raise_budget(needed_rows=2, dim=dim)
        self._buffer = embeddings.new_empty(min(self._capacity, embeddings.shape[0]), dim)

    def _reserve(self, rows: int) -> None:
        """Grow the buffer (doubling, at most to the capacity) to hold ``rows``: a small set never takes the budget."""
        if rows <= self._buffer.shape[0]:
            return
        size = min(self._capacity, max(rows, 2 * self._buffer.shape[0]))
        grown = self._buffer.new_empty(size, self._buffer.shape[1])
        grown[: self.rows] = self._buffer[: self.rows]
        self._buffer = grown

    def _reduce(self, target: int) -> None:
        """Replace the candidates by a greedy k-center coreset of ``target`` of them, compacted in place."""
        needed = coreset_size(self.seen, self.sampling_ratio)
        if needed > target:
            self._raise_budget(needed_rows=needed, dim=self._buffer.shape[1])
        seed = None if self.seed is None else self.seed + 1 + self.reductions
        indices = greedy_coreset_of_size(
            self._buffer[: self.rows], target, seed=seed, progress=self.progress, project=False
        )
        # Sorted, each kept row moves to a position at or before its own, so chunks never overwrite
        # a row still to be moved and no second buffer is needed.
        indices = indices.sort().values
        for first in range(0, target, _COMPACT_CHUNK):
            chunk = indices[first : first + _COMPACT_CHUNK]
            self._buffer[first : first + len(chunk)] = self._buffer.index_select(0, chunk)
        self.rows = target
        self.reductions += 1

    def _raise_budget(self, needed_rows: int, dim: int, ranks: int = 1) -> None:
        per_row = _COPIES * 4 * dim * max(2, ranks)
        needed_mb = needed_rows * per_row / 2**20
        msg = (
            f"{self.parameter}={self.memory_budget_mb:g} is too small: the coreset of the {self.seen} embeddings "
            f"(dimension {dim}) seen so far already has {needed_rows} rows at sampling ratio {self.sampling_ratio}, "
            f"which needs {self.parameter} >= {needed_mb:.1f}"
            + (f" with {ranks} ranks" if ranks > 1 else "")
            + ". Raise it or lower the sampling ratio."
        )
        raise ValueError(msg)

    # ------------------------------------------------------------------ result
    def finish(self, device: torch.device | None = None) -> torch.Tensor:
        """The coreset of every embedding streamed in (on every rank, under DDP); clears the store.

        ``device``: where an empty rank's placeholder lives (the collectives' device); default CPU.
        """
        if self._bar is not None:
            self._bar.close()
        ranks = world_size()
        total = int(sum_across_ranks(torch.tensor([self.seen], device=device or self.candidates.device))[0])
        if total == 0:
            msg = "No embeddings to build a memory bank from: the training set produced none."
            raise ValueError(msg)
        if ranks > 1:
            self._reduce_for_gather(total, ranks)
        local = self.candidates if self.rows else torch.empty(0, 0, device=device)
        candidates = gather_rows(local)
        size = coreset_size(total, self.sampling_ratio)
        if size > candidates.shape[0]:  # only after reductions: the gathered candidates cannot hold the coreset
            self._raise_budget(needed_rows=size, dim=candidates.shape[1], ranks=ranks)
        indices = greedy_coreset_of_size(candidates, size, seed=self.seed, progress=self.progress)
        indices = broadcast_from_first(indices.contiguous())
        coreset = candidates[indices].clone()
        self.clear()
        return coreset

    def _reduce_for_gather(self, total: int, ranks: int) -> None:
        """Reduce this rank's candidates to its share of the buffer, so that all ranks' together fit the budget."""
        if self._buffer is None:
            return
        share = self._capacity // ranks
        if self.rows > share:
            needed = coreset_size(total, self.sampling_ratio)
            if needed > share:
                self._raise_budget(needed_rows=needed, dim=self._buffer.shape[1], ranks=ranks)
            self._reduce(share)
