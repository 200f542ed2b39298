"""FaissMemoryBank: exact search against anomalib's, approximate recall, state, export, chunking, bad input.

Banks and queries are PatchCore embeddings of the embedded brick images (random-init resnet18,
see ``tests.test_coreset.patch_embeddings``): training images fill the bank, test images
(defects included) are the queries.
"""

from __future__ import annotations

import io
from functools import cache

import pytest
import torch
from anomalib.models.image.patchcore.torch_model import PatchcoreModel

from anomalib_mlff.components import FaissMemoryBank
from anomalib_mlff.components.memory_bank import NotFittedError
from tests.test_coreset import patch_embeddings, single_torch_thread  # noqa: F401 (autouse)


@cache
def fitted_bank() -> FaissMemoryBank:
    """Exact bank: a 10% coreset of 30 training images' embeddings (768 x 384)."""
    return FaissMemoryBank(progress=False).fit(patch_embeddings("train"), sampling_ratio=0.1)


def queries() -> torch.Tensor:
    """Embeddings of 12 test images (3072 x 384), more than anomalib's 1024-row chunk."""
    return patch_embeddings("test", count=12)


def anomalib_search(bank: torch.Tensor, embedding: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """anomalib's ``PatchcoreModel.nearest_neighbors`` over ``bank``."""
    model = PatchcoreModel(layers=["layer1"], backbone="resnet18", pre_trained=False)
    model.memory_bank = bank
    return model.nearest_neighbors(embedding, n_neighbors=k)


@pytest.mark.parametrize("k", [1, 9])
def test_exact_search_equals_anomalib_nearest_neighbors(k: int) -> None:
    bank = fitted_bank()
    distances, indices = bank.search(queries(), k)
    expected_distances, expected_indices = anomalib_search(bank.memory_bank, queries(), k)
    if k == 1:  # anomalib returns (n,) for one neighbour
        expected_distances, expected_indices = expected_distances.unsqueeze(1), expected_indices.unsqueeze(1)
    assert distances.shape == indices.shape == (len(queries()), k)
    torch.testing.assert_close(distances, expected_distances, rtol=1e-5, atol=1e-5)
    # indices agree except where two bank vectors tie to float precision; there, ours are as near
    differ = indices != expected_indices
    assert float(differ.float().mean()) < 1e-3
    true_distances = torch.linalg.vector_norm(
        queries().double().unsqueeze(1) - bank.memory_bank.double()[indices], dim=-1
    )
    torch.testing.assert_close(true_distances[differ], expected_distances[differ].double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {"index_type": "hnsw"},
        {"index_type": "hnsw", "fp16": True},
        {"index_type": "ivf"},
        {"index_type": "ivf", "fp16": True},
    ],
)
def test_approximate_search_recall_at_1(options: dict) -> None:
    exact_distances, exact_indices = fitted_bank().search(queries(), 1)
    bank = FaissMemoryBank(approximate=True, **options).set_memory(fitted_bank().memory_bank)
    distances, indices = bank.search(queries(), 1)
    recall = float((indices == exact_indices).float().mean())
    assert recall >= 0.99, recall
    found = indices == exact_indices
    torch.testing.assert_close(distances[found], exact_distances[found], rtol=1e-3, atol=1e-3)


def test_checkpoint_round_trip_restores_the_bank_and_rebuilds_the_index_lazily() -> None:
    source = FaissMemoryBank(approximate=True, progress=False).fit(patch_embeddings("train"), 0.05)
    expected = source.search(queries(), 3)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    restored = FaissMemoryBank(approximate=True)
    assert not restored.is_fitted
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert set(restored.state_dict()) == {"memory_bank"}
    assert torch.equal(restored.memory_bank, source.memory_bank)
    assert restored._index is None  # noqa: SLF001 - the index is derived state, not saved
    result = restored.search(queries(), 3)
    assert restored._index is not None  # noqa: SLF001
    torch.testing.assert_close(result, expected)


def test_refitting_loading_or_casting_invalidates_the_index() -> None:
    bank = FaissMemoryBank(progress=False).set_memory(torch.randn(100, 8))
    bank.search(torch.randn(3, 8))
    bank.set_memory(torch.randn(50, 8) + 100)  # every old vector is far from the new queries' answers
    query = torch.full((1, 8), 100.0)
    distances, _ = bank.search(query)
    assert float(distances) < 10  # a stale index would answer with an old vector, ~280 away
    bank.double()
    assert bank._index is None  # noqa: SLF001
    distances, _ = bank.search(query.double())
    assert distances.dtype == torch.float64


class _SearchModule(torch.nn.Module):
    def __init__(self, bank: FaissMemoryBank, k: int) -> None:
        super().__init__()
        self.bank, self.k = bank, k

    def forward(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bank.search(queries, self.k)


@pytest.mark.parametrize("approximate", [False, True])
def test_traced_and_exported_search_equal_faiss_search(approximate: bool) -> None:
    bank = FaissMemoryBank(approximate=approximate).set_memory(fitted_bank().memory_bank)
    sample, other = queries()[:512], queries()[512:1024]  # graphs are built on one, run on the other
    expected_distances, expected_indices = bank.search(other, 9)
    module = _SearchModule(bank, 9).eval()
    traced = torch.jit.trace(module, (sample,), check_trace=False)
    exported = torch.export.export(module, (sample,)).module()
    for graph in (traced, exported):
        distances, indices = graph(other)
        agree = (indices == expected_indices).all(dim=1)
        assert float(agree.float().mean()) >= (1.0 if not approximate else 0.99)
        torch.testing.assert_close(distances[agree], expected_distances[agree], rtol=1e-5, atol=1e-5)


def test_chunked_search_equals_unchunked_and_stays_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    bank_vectors = fitted_bank().memory_bank
    budget_mb = 0.25
    whole = FaissMemoryBank(search_budget_mb=1024).set_memory(bank_vectors).exact_search(queries(), 5)
    blocks: list[tuple[int, int]] = []
    original = PatchcoreModel.euclidean_dist

    def recording_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        blocks.append((x.shape[0], y.shape[0]))
        return original(x, y)

    monkeypatch.setattr(PatchcoreModel, "euclidean_dist", staticmethod(recording_dist))
    chunked = FaissMemoryBank(search_budget_mb=budget_mb).set_memory(bank_vectors).exact_search(queries(), 5)
    assert len(blocks) > 1
    assert max(rows * cols * 4 for rows, cols in blocks) <= budget_mb * 2**20
    assert torch.equal(chunked[1], whole[1])
    torch.testing.assert_close(chunked[0], whole[0])


def test_search_before_fit_is_a_clear_error() -> None:
    with pytest.raises(NotFittedError, match=r"not fitted: call fit\(\)"):
        FaissMemoryBank().search(torch.randn(2, 4))


@pytest.mark.parametrize(
    ("query", "k", "match"),
    [
        (torch.randn(3, 5), 1, "queries have dimension 5, the memory bank has 4"),
        (torch.randn(4), 1, "queries must be a 2-D tensor"),
        (torch.tensor([[0.0, float("nan"), 0.0, 0.0]]), 1, "queries hold NaN or inf"),
        (torch.randn(3, 4), 0, r"k must be an integer in \[1, 10\]"),
        (torch.randn(3, 4), 11, "k must be an integer"),
    ],
)
def test_bad_queries_are_clear_errors(query: torch.Tensor, k: int, match: str) -> None:
    bank = FaissMemoryBank().set_memory(torch.randn(10, 4))
    with pytest.raises(ValueError, match=match):
        bank.search(query, k)


@pytest.mark.parametrize(
    ("embeddings", "ratio", "match"),
    [
        (torch.empty(0, 4), 0.1, "embeddings is empty"),
        (torch.tensor([[float("inf"), 0.0]]), 1.0, "NaN or inf"),
        (torch.randn(10, 4), 0.0, "sampling_ratio"),
        (torch.randn(10, 4), 1.01, "sampling_ratio"),
    ],
)
def test_bad_fit_input_is_a_clear_error(embeddings: torch.Tensor, ratio: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FaissMemoryBank().fit(embeddings, ratio)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"index_type": "lsh"}, "index_type must be one of"),
        ({"fp16": True}, "fp16=True applies to approximate indexes only"),
        ({"approximate": True, "ef_search": 0}, "ef_search must be a positive integer"),
        ({"search_budget_mb": 0}, "search_budget_mb must be positive"),
    ],
)
def test_bad_settings_are_clear_errors(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FaissMemoryBank(**options)
