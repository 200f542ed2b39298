"""FaissPatchcore: anomalib's PatchCore on a FAISS coreset memory bank.

Same backbone, layers, pooling, scoring and re-weighting as ``anomalib.models.Patchcore`` (this
class inherits its training, validation, pre-processing and export); the coreset selection is
the fast greedy k-center of :mod:`anomalib_mlff.components.coreset` and the search runs through
FAISS, exact by default or approximate (HNSW/IVF) on request.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_mlff import FaissPatchcore
    >>> from anomalib_mlff.data import embedded_datamodule
    >>> model = FaissPatchcore(backbone="resnet18", pre_trained=False, approximate=True)
    >>> Engine().fit(model, datamodule=embedded_datamodule())  # doctest: +SKIP

CLI: ``anomalib train --model FaissPatchcore --model.approximate true --data MVTecAD``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from anomalib import PrecisionType
from anomalib.metrics import Evaluator
from anomalib.models import Patchcore
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_mlff.components.data_checks import check_before_fit, first_training_image
from anomalib_mlff.components.memory_bank import FaissMemoryBank
from anomalib_mlff.components.streaming_coreset import DEFAULT_MEMORY_BUDGET_MB, DEFAULT_OVERSAMPLING, embedding_rows

from .torch_model import FaissPatchcoreModel

__all__ = ["FaissPatchcore"]


class FaissPatchcore(Patchcore, AnomalibModule):
    """PatchCore with a greedy-coreset FAISS memory bank.

    ``AnomalibModule`` is named again as a direct base (the method order is still Patchcore's) because
    anomalib's ``get_model("faiss_patchcore")`` and ``list_models()`` look only at its direct subclasses.

    Args:
        backbone, layers, pre_trained, coreset_sampling_ratio, num_neighbors, precision:
            as ``anomalib.models.Patchcore``.
        approximate: approximate nearest-neighbour search instead of exact.
        index_type: ``"hnsw"`` or ``"ivf"`` (approximate search).
        fp16: float16 storage in the approximate index.
        ef_search: HNSW search breadth; nprobe: IVF lists visited per query.
        search_budget_mb: memory cap of one distance block in torch search (export, CUDA without faiss-gpu).
        shards: CPU shards of the search index; gpus: GPUs a CUDA bank is sharded across (-1: all).
        memory_budget_mb: memory for the training embeddings while the coreset is chosen (per rank);
            they stream through it in chunks (see :class:`StreamingCoreset` and ``components/SCALING.md``).
            A budget that cannot hold the coreset is refused before the first image is embedded. At
            ratio >= 0.1 within the budget the coreset is exactly the all-in-memory one.
        coreset_oversampling: each chunk of training embeddings is reduced on its own to this many times
            its share of the coreset before the final greedy (the streamed fit's time stays linear in the
            images). ``None``: no chunk reduction, so within the budget the coreset is exactly the
            all-in-memory one (anomalib's at ``seed=None``) at any ratio.
        seed: seeds the coreset's random projection and start. ``None`` (default): both come from
            the global RNGs as in anomalib's ``KCenterGreedy``, so under the same ``seed_everything``
            the coreset, and the scores, are anomalib Patchcore's.
        skip_bad_images: leave unreadable, truncated, empty or 16-bit image files out (with a
            warning) instead of stopping before training with their list.
        pre_processor, post_processor, evaluator, visualizer: anomalib components.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        pre_trained: bool = True,
        coreset_sampling_ratio: float = 0.1,
        num_neighbors: int = 9,
        approximate: bool = False,
        index_type: str = "hnsw",
        fp16: bool = False,
        ef_search: int = 32,
        nprobe: int = 16,
        search_budget_mb: float = 256.0,
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
        coreset_oversampling: float | None = DEFAULT_OVERSAMPLING,
        shards: int = 1,
        gpus: int = 1,
        seed: int | None = None,
        skip_bad_images: bool = False,
        precision: str | PrecisionType = PrecisionType.FLOAT32,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        bank = FaissMemoryBank(
            approximate=approximate,
            index_type=index_type,
            fp16=fp16,
            ef_search=ef_search,
            nprobe=nprobe,
            search_budget_mb=search_budget_mb,
            shards=shards,
            gpus=gpus,
            seed=seed,
        )
        # anomalib's __init__ sets up everything (components, precision checks) around a
        # PatchcoreModel; a random-init one is built there (no download) and replaced below, so
        # no line of it is copied. Hyperparameters are saved from this frame's arguments. The
        # RNG is restored afterwards, so a random-init backbone gets the weights that anomalib's
        # Patchcore would get at the same seed.
        with torch.random.fork_rng(devices=[]):
            super().__init__(
                backbone=backbone,
                layers=layers,
                pre_trained=False,
                coreset_sampling_ratio=coreset_sampling_ratio,
                num_neighbors=num_neighbors,
                precision=precision,
                pre_processor=pre_processor,
                post_processor=post_processor,
                evaluator=evaluator,
                visualizer=visualizer,
            )
        self.skip_bad_images = skip_bad_images
        dtype = next(self.model.feature_extractor.parameters()).dtype  # float32 or float16, as anomalib chose
        self.model: FaissPatchcoreModel = FaissPatchcoreModel(
            layers=layers,
            backbone=backbone,
            pre_trained=pre_trained,
            num_neighbors=num_neighbors,
            bank=bank,
            memory_budget_mb=memory_budget_mb,
            coreset_sampling_ratio=coreset_sampling_ratio,
            coreset_oversampling=coreset_oversampling,
        ).to(dtype)

    def on_fit_start(self) -> None:
        """Before embedding anything: every image file readable, at least one training image, and a
        ``memory_budget_mb`` that holds the coreset of all training embeddings (images x patches)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        images = check_before_fit(datamodule, self.skip_bad_images)
        image = first_training_image(datamodule, self.pre_processor) if images > 0 else None
        if image is not None:
            rows, dim = embedding_rows(self.model, self.model.embed, image.to(self.device))
            store = self.model.embedding_store
            store.sampling_ratio = self.coreset_sampling_ratio
            store.check_budget(images * rows, dim, ranks=self.trainer.world_size)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """anomalib Patchcore's, without its ``devices=1`` pin: the bank is combined across DDP ranks."""
        arguments = dict(super().trainer_arguments)
        arguments.pop("devices", None)
        return arguments
