"""Sharded FAISS search (``faiss.IndexShards`` over CPU sub-indexes) against the single index."""

from __future__ import annotations

import pytest
import torch

from anomalib_mlff.components.memory_bank import FaissMemoryBank


def bank_and_queries() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2003, 32, generator=generator), torch.randn(300, 32, generator=generator)


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_exact_sharded_search_returns_the_single_index_neighbours(shards: int) -> None:
    vectors, queries = bank_and_queries()
    single = FaissMemoryBank(progress=False).set_memory(vectors)
    sharded = FaissMemoryBank(shards=shards, progress=False).set_memory(vectors)
    expected_distances, expected_indices = single.search(queries, k=5)
    distances, indices = sharded.search(queries, k=5)
    assert type(sharded.build_index()).__name__ == "IndexShards"
    assert sharded.build_index().count() == shards
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(distances, expected_distances)


def test_more_shards_than_vectors_and_approximate_shards_still_search() -> None:
    vectors, queries = bank_and_queries()
    tiny = FaissMemoryBank(shards=4, progress=False).set_memory(vectors[:2])
    assert tiny.search(queries, k=2)[1].shape == (300, 2)
    approximate = FaissMemoryBank(approximate=True, shards=3, progress=False).set_memory(vectors)
    _, indices = approximate.search(queries, k=1)
    _, exact = FaissMemoryBank(progress=False).set_memory(vectors).search(queries, k=1)
    assert float((indices == exact).float().mean()) > 0.9  # HNSW recall per shard


@pytest.mark.parametrize(("name", "value"), [("shards", 0), ("gpus", 0), ("gpus", -2)])
def test_bad_shard_counts_are_rejected(name: str, value: int) -> None:
    with pytest.raises(ValueError, match=name):
        FaissMemoryBank(**{name: value})
