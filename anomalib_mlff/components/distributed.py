"""torch.distributed collectives for fitting memory-bank models under Lightning's DDP.

Each function is the identity in a single process (no process group), so the fitting code is the
same with and without DDP. Tensors travel on their own device: CPU with gloo, CUDA with NCCL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "broadcast_from_first",
    "gather_rows",
    "is_distributed",
    "max_across_ranks",
    "sum_across_ranks",
    "world_size",
]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``tensor`` over all ranks, in place (no second copy of large statistics); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def max_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all ranks, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's 2-D ``rows`` in rank order; ranks may hold different numbers of rows, or none.

    ``all_gather`` needs equal shapes, so each rank pads to the largest row count and the counts
    travel first. A rank without rows passes a ``(0, 0)`` tensor; the width comes from the others.
    """
    if not is_distributed():
        return rows
    shape = torch.tensor(rows.shape, dtype=torch.long, device=rows.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    counts = [int(s[0]) for s in shapes]
    width = max(int(s[1]) for s in shapes)
    padded = torch.zeros(max(counts), width, dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0], : rows.shape[1]] = rows
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:count] for part, count in zip(gathered, counts, strict=True)])


def broadcast_from_first(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank (same shape and dtype on every rank), so all ranks agree exactly."""
    if is_distributed():
        dist.broadcast(tensor, src=0)
    return tensor
