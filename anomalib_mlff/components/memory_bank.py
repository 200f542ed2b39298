"""A PatchCore memory bank: greedy coreset, FAISS k-nearest-neighbour search, bounded memory.

The bank's vectors are the module's only state (the ``memory_bank`` buffer), so Lightning
checkpoints save and restore it; the FAISS index is derived state, built on the first search
after fitting, loading or moving the module. Distances are Euclidean (not squared), as anomalib's
``PatchcoreModel.nearest_neighbors``.

Backends, chosen per call:

* FAISS on the CPU: ``IndexFlatL2`` (exact), ``IndexHNSWFlat``/``IndexHNSWSQ`` or
  ``IndexIVFFlat``/``IndexIVFScalarQuantizer`` (approximate; ``SQ`` = fp16 storage).
* FAISS on the GPU when faiss-gpu is installed and the bank is on CUDA: flat or IVF (faiss has
  no GPU HNSW, so approximate GPU search uses IVF).
* Pure torch (anomalib's ``euclidean_dist``, in chunks) while a graph is traced or exported (an
  exported graph cannot call FAISS), and for exact search of a CUDA bank without faiss-gpu.

Banks larger than one device are sharded with FAISS's own ``IndexShards``: ``shards`` CPU
sub-indexes searched in parallel threads, or (a CUDA bank with faiss-gpu, ``gpus`` > 1 or -1)
``index_cpu_to_all_gpus`` with ``GpuMultipleClonerOptions.shard``, one slice of the bank per GPU.
FAISS merges the shards' results, so exact sharded search returns the single index's neighbours.
The multi-GPU path follows FAISS's documented API and has not been run on a multi-GPU machine yet.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import faiss
import faiss.contrib.torch_utils  # noqa: F401  (lets FAISS indexes take torch tensors, CPU and CUDA)
import torch
from anomalib.models.components import DynamicBufferMixin
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from torch import nn

from .coreset import greedy_coreset, validate_embeddings
from .model_checks import capturing_graph

logger = logging.getLogger(__name__)

INDEX_TYPES = ("hnsw", "ivf")
# faiss warns when an IVF list gets fewer training points than this.
MIN_POINTS_PER_LIST = 39

__all__ = ["FaissMemoryBank", "NotFittedError", "faiss_gpu_available"]


class NotFittedError(RuntimeError):
    """The memory bank was searched before it was fitted or loaded."""


def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_gpu_resources: Any = None


def _gpu_resources_for(budget_bytes: int) -> Any:  # noqa: ANN401 - faiss.StandardGpuResources
    """One shared faiss GPU resource object, its scratch memory capped at the search budget."""
    global _gpu_resources  # noqa: PLW0603 - one per process, as faiss recommends
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
        _gpu_resources.setTempMemory(budget_bytes)
    return _gpu_resources


class FaissMemoryBank(DynamicBufferMixin, nn.Module):
    """Coreset memory bank with exact or approximate FAISS nearest-neighbour search.

    Args:
        approximate: use an approximate index (``index_type``) instead of exact search.
        index_type: ``"hnsw"`` (default) or ``"ivf"``, for approximate search.
        fp16: store approximate-index vectors in float16 (half the memory, same speed or faster).
        hnsw_m: HNSW graph degree (16: recall@1 0.997 at ef_search 32 on 20k x 1536 PatchCore banks).
        ef_search: HNSW candidate list length at search time (recall vs speed).
        ef_construction: HNSW candidate list length while building.
        nlist: IVF lists; default ``4 * sqrt(bank size)``, at most one per 39 vectors.
        nprobe: IVF lists visited per query (recall vs speed).
        search_budget_mb: most memory one query-by-bank distance block may take in torch search.
        shards: CPU sub-indexes the bank is split into (``faiss.IndexShards``, searched in parallel).
        gpus: GPUs a CUDA bank is sharded across with faiss-gpu (1: one GPU; -1: all visible GPUs).
        seed: seeds the coreset and IVF training; ``None``: the coreset follows the global RNGs
            exactly as anomalib's ``KCenterGreedy`` (see :func:`greedy_coreset`), IVF uses 0.
        progress: show a progress bar on long coreset selections.

    Example:
        >>> bank = FaissMemoryBank().fit(torch.randn(1000, 64), sampling_ratio=0.1)
        >>> distances, indices = bank.search(torch.randn(5, 64), k=3)
        >>> distances.shape, indices.shape
        (torch.Size([5, 3]), torch.Size([5, 3]))
    """

    memory_bank: torch.Tensor

    def __init__(
        self,
        approximate: bool = False,
        index_type: str = "hnsw",
        fp16: bool = False,
        hnsw_m: int = 16,
        ef_search: int = 32,
        ef_construction: int = 40,
        nlist: int | None = None,
        nprobe: int = 16,
        search_budget_mb: float = 256.0,
        shards: int = 1,
        gpus: int = 1,
        seed: int | None = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if index_type not in INDEX_TYPES:
            msg = f"index_type must be one of {INDEX_TYPES}, got {index_type!r}."
            raise ValueError(msg)
        if fp16 and not approximate:
            msg = "fp16=True applies to approximate indexes only; exact search (approximate=False) keeps float32."
            raise ValueError(msg)
        for name, value in (("hnsw_m", hnsw_m), ("ef_search", ef_search), ("ef_construction", ef_construction),
                            ("nprobe", nprobe), ("nlist", 1 if nlist is None else nlist), ("shards", shards),
                            ("gpus", 1 if gpus == -1 else gpus)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"{name} must be a positive integer, got {value!r}."
                raise ValueError(msg)
        if not search_budget_mb > 0:
            msg = f"search_budget_mb must be positive, got {search_budget_mb}."
            raise ValueError(msg)
        self.approximate = approximate
        self.index_type = index_type
        self.fp16 = fp16
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self.ef_construction = ef_construction
        self.nlist = nlist
        self.nprobe = nprobe
        self.search_budget_mb = search_budget_mb
        self.shards = shards
        self.gpus = gpus
        self.seed = seed
        self.progress = progress
        self.register_buffer("memory_bank", torch.empty(0))
        self._index: Any = None  # faiss index over memory_bank, or None until the next search
        self._parts: list[Any] = []  # the index itself, or its shards (kept alive here: IndexShards does not own them)
        self._index_on_cpu_for_cuda_bank = False

    # ------------------------------------------------------------------ state
    @property
    def is_fitted(self) -> bool:
        """True once the bank holds vectors (fitted, set or loaded)."""
        return self.memory_bank.ndim == 2 and self.memory_bank.shape[0] > 0

    def fit(self, embeddings: torch.Tensor, sampling_ratio: float) -> FaissMemoryBank:
        """Keep a greedy k-center coreset of ``embeddings`` (``sampling_ratio`` of them) as the bank."""
        indices = greedy_coreset(embeddings, sampling_ratio, seed=self.seed, progress=self.progress)
        return self.set_memory(embeddings[indices])

    def set_memory(self, vectors: torch.Tensor) -> FaissMemoryBank:
        """Use ``vectors`` as the bank as they are (no coreset)."""
        validate_embeddings(vectors, name="vectors")
        self.memory_bank = vectors.detach().contiguous()
        self._index = None
        return self

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> FaissMemoryBank:  # noqa: ANN401
        """Moving or casting the bank (``.to``, ``.cuda``, ``.half``) invalidates the index."""
        self._index = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:  # noqa: ANN401
        """Loading a checkpoint replaces the bank, so the index is rebuilt on the next search."""
        self._index = None
        super()._load_from_state_dict(state_dict, prefix, *args)

    # ----------------------------------------------------------------- search
    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``k`` nearest bank vectors of each query: ``(distances, indices)``, both ``(len(queries), k)``.

        Distances are Euclidean, in the queries' dtype, on the queries' device; indices are int64
        rows of ``memory_bank``.
        """
        if capturing_graph():  # inputs come from the traced model itself; FAISS cannot be recorded
            return self.exact_search(queries, k)
        self._check_search(queries, k)
        if self._use_torch(queries):
            return self.exact_search(queries, k)
        index = self.build_index()
        on_cpu = self._index_on_cpu_for_cuda_bank
        flat_queries = queries.detach().float().contiguous()
        if on_cpu:
            flat_queries = flat_queries.cpu()
        for part in self._parts:
            if hasattr(part, "hnsw"):
                part.hnsw.efSearch = max(self.ef_search, k)
        squared, indices = index.search(flat_queries, k)
        distances = squared.clamp_min_(0).sqrt_()
        missing = (indices < 0).any(dim=1)
        if bool(missing.any()):  # an approximate index found fewer than k: answer those rows exactly
            rows = missing.nonzero().squeeze(1)
            exact_distances, exact_indices = self.exact_search(flat_queries[rows].to(self.memory_bank), k)
            distances[rows] = exact_distances.float().to(distances.device)
            indices[rows] = exact_indices.to(indices.device)
        return distances.to(device=queries.device, dtype=queries.dtype), indices.to(queries.device)

    def exact_search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact search in pure torch (anomalib's ``euclidean_dist``), in chunks within ``search_budget_mb``.

        This is the path traced or exported graphs take. They search all their queries in one
        block: a block count that depends on the batch size would fix the exported batch size.
        """
        if capturing_graph():
            return self._search_block(queries, k)
        rows = self._rows_per_block()
        if queries.shape[0] <= rows:
            return self._search_block(queries, k)
        blocks = [self._search_block(queries[start : start + rows], k) for start in range(0, queries.shape[0], rows)]
        return torch.cat([block[0] for block in blocks]), torch.cat([block[1] for block in blocks])

    def _rows_per_block(self) -> int:
        """Queries per block so that a block's distances to the whole bank fit in ``search_budget_mb``."""
        bytes_per_row = int(self.memory_bank.shape[0]) * self.memory_bank.element_size()
        return max(1, int(self.search_budget_mb * 2**20) // bytes_per_row)

    def _search_block(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        distances = PatchcoreModel.euclidean_dist(queries, self.memory_bank)
        if k == 1:
            return distances.min(dim=1, keepdim=True)
        return distances.topk(k=k, largest=False, dim=1)

    def _check_search(self, queries: torch.Tensor, k: int) -> None:
        if not self.is_fitted:
            msg = "FaissMemoryBank is not fitted: call fit() or set_memory(), or load a state_dict, before search()."
            raise NotFittedError(msg)
        if not isinstance(queries, torch.Tensor) or queries.ndim != 2:
            shape = tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
            msg = f"queries must be a 2-D tensor (count, dim), got {shape}."
            raise ValueError(msg)
        if queries.shape[1] != self.memory_bank.shape[1]:
            msg = f"queries have dimension {queries.shape[1]}, the memory bank has {self.memory_bank.shape[1]}."
            raise ValueError(msg)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.memory_bank.shape[0]:
            msg = f"k must be an integer in [1, {self.memory_bank.shape[0]}] (the bank size), got {k!r}."
            raise ValueError(msg)
        if queries.device != self.memory_bank.device:
            msg = f"queries are on {queries.device}, the memory bank on {self.memory_bank.device}."
            raise ValueError(msg)
        if not bool(torch.isfinite(queries).all()):
            msg = "queries hold NaN or inf values."
            raise ValueError(msg)

    def _use_torch(self, queries: torch.Tensor) -> bool:
        """Exact search of a CUDA bank without faiss-gpu stays on the GPU in torch."""
        return queries.is_cuda and not self.approximate and not faiss_gpu_available()

    # ------------------------------------------------------------------ index
    def build_index(self) -> Any:  # noqa: ANN401 - a faiss.Index
        """The FAISS index over the bank, built now if the bank changed since the last build."""
        if self._index is None:
            if not self.is_fitted:
                msg = "FaissMemoryBank is not fitted: nothing to index."
                raise NotFittedError(msg)
            self._index = self._new_index()
        return self._index

    def _new_index(self) -> Any:  # noqa: ANN401
        bank = self.memory_bank.detach().float().contiguous()
        self._index_on_cpu_for_cuda_bank = False
        if bank.is_cuda and faiss_gpu_available():
            if self.gpus == 1 or faiss.get_num_gpus() == 1:
                index = self._new_gpu_index(bank)
                self._parts = [index]
                return index
            self._index_on_cpu_for_cuda_bank = True  # the sharded index is driven from the host
            return self._new_multi_gpu_index(bank.cpu())
        if bank.is_cuda:
            logger.warning("faiss has no GPU support here: approximate search of a CUDA bank runs on the CPU.")
            self._index_on_cpu_for_cuda_bank = True
            bank = bank.cpu()
        self._parts = [self._filled_cpu_index(part) for part in bank.tensor_split(min(self.shards, bank.shape[0]))]
        if len(self._parts) == 1:
            return self._parts[0]
        index = faiss.IndexShards(bank.shape[1], True, True)  # threaded; shard i's ids follow shard i-1's
        for part in self._parts:
            index.add_shard(part)
        return index

    def _filled_cpu_index(self, vectors: torch.Tensor) -> Any:  # noqa: ANN401
        index = self._new_cpu_index(vectors.shape[1], vectors.shape[0])
        if not index.is_trained:
            index.train(vectors)
        index.add(vectors)
        return index

    def _new_multi_gpu_index(self, bank: torch.Tensor) -> Any:  # noqa: ANN401
        """The bank sharded across GPUs (FAISS's ``index_cpu_to_all_gpus`` with ``shard=True``)."""
        count, dim = bank.shape
        if self.approximate and self.index_type == "hnsw":
            logger.info("faiss has no GPU HNSW: approximate GPU search uses an IVF index.")
        cpu_index = self._new_ivf(dim, count) if self.approximate else faiss.IndexFlatL2(dim)
        if not cpu_index.is_trained:
            cpu_index.train(bank)
        cpu_index.add(bank)
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        options.useFloat16 = self.fp16
        index = faiss.index_cpu_to_all_gpus(cpu_index, co=options, ngpu=self.gpus if self.gpus > 0 else -1)
        if self.approximate:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", min(self.nprobe, self._ivf_lists(count)))
        self._parts = []
        return index

    def _ivf_lists(self, count: int) -> int:
        default = round(4 * math.sqrt(count))
        return max(1, min(self.nlist or default, count // MIN_POINTS_PER_LIST))

    def _new_cpu_index(self, dim: int, count: int) -> Any:  # noqa: ANN401
        if not self.approximate:
            return faiss.IndexFlatL2(dim)
        if self.index_type == "hnsw":
            if self.fp16:
                index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, self.hnsw_m)
            else:
                index = faiss.IndexHNSWFlat(dim, self.hnsw_m)
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self.ef_search
            return index
        return self._new_ivf(dim, count)

    def _new_ivf(self, dim: int, count: int) -> Any:  # noqa: ANN401
        lists = self._ivf_lists(count)
        quantizer = faiss.IndexFlatL2(dim)
        if self.fp16:
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, lists, faiss.ScalarQuantizer.QT_fp16)
        else:
            index = faiss.IndexIVFFlat(quantizer, dim, lists)
        index.cp.seed = 0 if self.seed is None else self.seed
        index.nprobe = min(self.nprobe, lists)
        return index

    def _new_gpu_index(self, bank: torch.Tensor) -> Any:  # noqa: ANN401
        resources = _gpu_resources_for(int(self.search_budget_mb * 2**20))
        device = bank.device.index or 0
        count, dim = bank.shape
        if not self.approximate:
            config = faiss.GpuIndexFlatConfig()
            config.device = device
            index = faiss.GpuIndexFlatL2(resources, dim, config)
        else:
            if self.index_type == "hnsw":
                logger.info("faiss has no GPU HNSW: approximate GPU search uses an IVF index.")
            index = faiss.index_cpu_to_gpu(resources, device, self._new_ivf(dim, count))
            index.nprobe = min(self.nprobe, self._ivf_lists(count))
            index.train(bank)
        index.add(bank)
        return index

    def extra_repr(self) -> str:
        """Configuration and bank size, for ``print(module)``."""
        kind = f"approximate={self.index_type}{'/fp16' if self.fp16 else ''}" if self.approximate else "exact"
        sharding = f", shards={self.shards}" if self.shards > 1 else ""
        return f"{kind}{sharding}, bank={tuple(self.memory_bank.shape)}"
