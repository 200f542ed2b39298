"""FaissPatchcore inside anomalib: same results as anomalib's Patchcore, checkpoints, OpenVINO export.

Tiny CPU settings: resnet18 with random weights (no download offline), 64 px images of the
embedded brick category.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path
from tempfile import TemporaryDirectory, mkdtemp

import numpy as np
import pytest
import torch
from anomalib.engine import Engine
from anomalib.models import Patchcore
from lightning.pytorch import seed_everything

from anomalib_mlff import FaissPatchcore
from anomalib_mlff.data import embedded_datamodule
from anomalib_mlff.deploy import openvino_inferencer
from tests.test_coreset import single_torch_thread  # noqa: F401 (autouse fixture)

IMAGE_SIZE = (64, 64)
SEED = 0
RUNS = TemporaryDirectory(prefix="faiss_patchcore_")  # the cached fits' result folders


@pytest.fixture(autouse=True, scope="module")
def _remove_runs_after_module() -> Iterator[None]:
    """Delete the cached fits and their folders once this module's tests are done (they hold ~17 MB)."""
    yield
    fitted.cache_clear()
    RUNS.cleanup()


def build(model_class: type[Patchcore], **options: object) -> Patchcore:
    """A tiny PatchCore-family model, constructed right after seeding (same backbone weights per seed)."""
    seed_everything(SEED, verbose=False)
    return model_class(
        backbone="resnet18",
        pre_trained=False,
        pre_processor=model_class.configure_pre_processor(image_size=IMAGE_SIZE),
        visualizer=False,
        **options,
    )


def datamodule() -> object:
    return embedded_datamodule("brick", train_batch_size=32, eval_batch_size=32)


@cache
def fitted(model_class: type[Patchcore], **options: object) -> tuple[Patchcore, Engine, dict[str, float]]:
    """Fit and test a model once per settings; returns the model, its engine and its test metrics."""
    model = build(model_class, **options)
    engine = Engine(default_root_dir=mkdtemp(dir=RUNS.name), logger=False,
                    enable_progress_bar=False, enable_model_summary=False)
    data = datamodule()
    engine.fit(model, datamodule=data)
    metrics = engine.test(model, datamodule=data, verbose=False)[0]
    return model, engine, metrics


def test_same_seed_gives_anomalib_patchcore_backbone_weights() -> None:
    ours, theirs = build(FaissPatchcore), build(Patchcore)
    expected = theirs.model.feature_extractor.state_dict()
    for name, tensor in ours.model.feature_extractor.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.slow
def test_auroc_equals_anomalib_patchcore_on_the_full_bank() -> None:
    """Exact mode, coreset = every embedding: only the pipeline (search, scoring, re-weighting) can differ."""
    _, _, ours = fitted(FaissPatchcore, coreset_sampling_ratio=1.0)
    _, _, theirs = fitted(Patchcore, coreset_sampling_ratio=1.0)
    for key in ("image_AUROC", "pixel_AUROC"):
        assert ours[key] == pytest.approx(theirs[key], abs=0.005), (key, ours[key], theirs[key])


@pytest.mark.slow
def test_same_seed_gives_anomalib_patchcores_coreset_and_auroc_at_ten_percent() -> None:
    """Default ``seed=None``: the coreset follows ``seed_everything`` as anomalib's KCenterGreedy does."""
    ours_model, _, ours = fitted(FaissPatchcore, coreset_sampling_ratio=0.1)
    theirs_model, _, theirs = fitted(Patchcore, coreset_sampling_ratio=0.1)
    assert torch.equal(ours_model.model.memory_bank, theirs_model.model.memory_bank)
    for key in ("image_AUROC", "pixel_AUROC"):
        assert ours[key] == pytest.approx(theirs[key], abs=0.005), (key, ours[key], theirs[key])


@pytest.mark.slow
def test_coreset_fit_keeps_ten_percent_and_approximate_search_keeps_the_auroc() -> None:
    exact_model, _, exact = fitted(FaissPatchcore, coreset_sampling_ratio=0.1)
    approximate_model, _, approximate = fitted(FaissPatchcore, coreset_sampling_ratio=0.1, approximate=True)
    embeddings = 60 * (IMAGE_SIZE[0] // 8) ** 2  # 60 training images, layer2 at stride 8
    assert exact_model.model.memory_bank.shape == (int(embeddings * 0.1), 384)
    assert torch.equal(exact_model.model.memory_bank, approximate_model.model.memory_bank)  # same seed, same coreset
    for key in ("image_AUROC", "pixel_AUROC"):
        assert approximate[key] == pytest.approx(exact[key], abs=0.005), key


def predict_maps(model: Patchcore, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(images).anomaly_map


def sample_images(count: int = 4) -> torch.Tensor:
    data = datamodule()
    data.setup()
    step = len(data.test_data) // count
    return torch.stack([data.test_data[i].image for i in range(0, step * count, step)])


@pytest.mark.slow
def test_checkpoint_round_trip_restores_the_bank_and_rebuilds_the_index(tmp_path: Path) -> None:
    model, engine, _ = fitted(FaissPatchcore, coreset_sampling_ratio=0.1, approximate=True)
    path = tmp_path / "faiss_patchcore.ckpt"
    engine.trainer.save_checkpoint(path)
    restored = FaissPatchcore.load_from_checkpoint(path)
    assert restored.model.bank.approximate
    assert torch.equal(restored.model.memory_bank, model.model.memory_bank)
    assert restored.model.bank._index is None  # noqa: SLF001 - derived state, rebuilt on first search
    images = sample_images()
    torch.testing.assert_close(predict_maps(restored, images), predict_maps(model, images), rtol=0, atol=1e-6)
    assert restored.model.bank._index is not None  # noqa: SLF001


@pytest.mark.slow
def test_openvino_export_matches_torch_at_f32(tmp_path: Path) -> None:
    model, engine, _ = fitted(FaissPatchcore, coreset_sampling_ratio=0.1)
    exported = engine.export(model, export_type="openvino", export_root=tmp_path)
    inferencer = openvino_inferencer(exported)
    images = sample_images()
    expected = predict_maps(model, images)  # FAISS search in torch; the exported graph searches in pure torch
    for index in range(images.shape[0]):
        result = inferencer.predict(images[index : index + 1])
        np.testing.assert_allclose(np.asarray(result.anomaly_map), expected[index : index + 1].numpy(), atol=1e-4)


@pytest.mark.slow
def test_a_budget_smaller_than_the_training_embeddings_streams_through_reductions() -> None:
    """The fit reduces its candidates within the budget and still keeps 10% of every embedding it saw.

    The store must know the coreset ratio from its first reduction on: a store that assumed ratio 1 would
    refuse any training set larger than the budget.
    """
    model = build(FaissPatchcore, coreset_sampling_ratio=0.1, memory_budget_mb=6, seed=SEED)
    store = model.model.embedding_store
    capacity = store.capacity(384)  # resnet18 layer2 + layer3
    reductions: list[int] = []
    reduce = store._reduce  # noqa: SLF001

    def counting_reduce(target: int) -> None:
        reductions.append(store.rows)
        reduce(target)

    store._reduce = counting_reduce  # noqa: SLF001
    engine = Engine(default_root_dir=mkdtemp(dir=RUNS.name), logger=False,
                    enable_progress_bar=False, enable_model_summary=False)
    engine.fit(model, datamodule=datamodule())
    images = len(engine.trainer.datamodule.train_data)
    seen = images * (IMAGE_SIZE[0] // 8) * (IMAGE_SIZE[1] // 8)  # layer2's grid
    assert seen > capacity and reductions and max(reductions) <= capacity
    assert model.model.memory_bank.shape[0] == int(seen * 0.1)


@pytest.mark.slow
@pytest.mark.parametrize("fault", [None, KeyboardInterrupt, MemoryError])
def test_a_fit_interrupted_while_choosing_the_coreset_writes_no_checkpoint(
    fault: type[BaseException] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C or running out of memory during the coreset leaves no checkpoint that could load as if complete.

    ``None``: the same fit uninterrupted writes its checkpoint there, with the whole bank.
    """
    from anomalib_mlff.components.streaming_coreset import StreamingCoreset

    def interrupted(self: StreamingCoreset, device: torch.device | None = None) -> torch.Tensor:
        raise fault

    if fault is not None:
        monkeypatch.setattr(StreamingCoreset, "finish", interrupted)
    model = build(FaissPatchcore, coreset_sampling_ratio=0.1, seed=SEED)
    root = Path(mkdtemp(dir=RUNS.name))
    engine = Engine(default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False)
    if fault is None:
        engine.fit(model, datamodule=datamodule())
        assert len(list(root.rglob("*.ckpt"))) == 1 and model.model.memory_bank.shape[0] > 0
        return
    try:
        engine.fit(model, datamodule=datamodule())
    except (fault, SystemExit):
        pass  # Lightning stops a KeyboardInterrupt gracefully (or exits); a MemoryError propagates
    assert not list(root.rglob("*.ckpt"))
    assert model.model.memory_bank.shape[0] == 0  # nothing half-fitted in memory either


def test_a_budget_too_small_for_the_coreset_is_refused_before_embedding_anything() -> None:
    model = build(FaissPatchcore, coreset_sampling_ratio=0.1, memory_budget_mb=0.5, seed=SEED)
    engine = Engine(default_root_dir=mkdtemp(dir=RUNS.name), logger=False,
                    enable_progress_bar=False, enable_model_summary=False)
    refusal = r"memory_budget_mb=0.5 is too small.*training embeddings.*memory_budget_mb >= "
    with pytest.raises(ValueError, match=refusal):
        engine.fit(model, datamodule=datamodule())
    assert model.model.embedding_store.seen == 0  # refused in on_fit_start, not after the embedding pass
