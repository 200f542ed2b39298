"""F2PAD on anomalib models without a registered scorer: their own forward pass, differentiated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import InferenceBatch, MVTecAD
from anomalib.engine import Engine
from anomalib.metrics import Evaluator
from anomalib.models import Draem, Fastflow, ReverseDistillation
from anomalib.data.utils.tiler import Tiler
from anomalib.models.components import TimmFeatureExtractor
from anomalib.models.image.cflow.torch_model import CflowModel
from anomalib.models.image.fastflow.torch_model import FastflowModel
from lightning.pytorch import seed_everything
from PIL import Image
from torch import nn

from anomalib_mlff import F2PAD, Dice, IoU
from anomalib_mlff.data import EMBEDDED_ROOT
from anomalib_mlff.post_processing.f2pad.scorers import (
    AnomalyMapScorer,
    CflowScorer,
    MissingScorerError,
    build_scorer,
    scorer_class_for,
)
from tests.f2pad_fixtures import IMAGENET, SIZE, assert_feature_gradient_matches_finite_differences

COLOURS = ((0.9, 0.2, 0.6), (0.1, 0.8, 0.9), (0.95, 0.9, 0.1), (0.2, 0.3, 0.95))


def tiny_fastflow() -> FastflowModel:
    torch.manual_seed(0)
    return FastflowModel(input_size=(SIZE, SIZE), backbone="resnet18", pre_trained=False, flow_steps=2).eval()


def test_unregistered_anomalib_models_get_the_anomaly_map_scorer() -> None:
    scorer = build_scorer(tiny_fastflow(), IMAGENET, num_candidates=5)
    assert type(scorer) is AnomalyMapScorer
    assert (scorer.stride, scorer.crop_allowed) == (1, False)


class FeatureEnergy(nn.Module):
    """A small anomalib-style model: squared layer1 features of a timm ResNet as a quarter-size map."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.feature_extractor = TimmFeatureExtractor("resnet18", layers=["layer1"], pre_trained=False)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        anomaly_map = self.feature_extractor(images)["layer1"].square().mean(1, keepdim=True)
        return InferenceBatch(pred_score=anomaly_map.amax((1, 2, 3)), anomaly_map=anomaly_map)


FeatureEnergy.__module__ = "anomalib.models.image.example"  # an anomalib model F2PAD has no scorer for


def test_anomaly_map_gradient_matches_finite_differences() -> None:
    """Through the model's feature extractor (run without grad by default) and the map's resize to the image."""
    model = FeatureEnergy().eval()
    scorer = build_scorer(model, IMAGENET, num_candidates=5)
    assert type(scorer) is AnomalyMapScorer
    assert_feature_gradient_matches_finite_differences(scorer, model)  # a random image: no max-pool ties


def tiny_cflow() -> CflowModel:
    torch.manual_seed(0)
    return CflowModel(backbone="resnet18", layers=("layer1", "layer2"), pre_trained=False, coupling_blocks=2).eval()


def test_cflow_scorer_keeps_the_graph_its_forward_drops() -> None:
    """CFLOW's forward gives no gradient; its scorer's does, and it matches finite differences."""
    model = tiny_cflow()
    with torch.enable_grad():
        image = torch.rand(1, 3, SIZE, SIZE, requires_grad=True)
        assert not model(image).anomaly_map.requires_grad
    scorer = build_scorer(model, IMAGENET, num_candidates=5)
    assert type(scorer) is CflowScorer
    scorer.check_differentiable((SIZE, SIZE))
    assert_feature_gradient_matches_finite_differences(scorer, model)


def test_cflow_scores_rank_positions_as_cflow_does() -> None:
    """One layer: where CFLOW's map samples its grid, it falls with the likelihood the scorer's NLL measures."""
    torch.manual_seed(0)
    model = CflowModel(backbone="resnet18", layers=("layer2",), pre_trained=False, coupling_blocks=2).eval()
    scorer = build_scorer(model, IMAGENET, num_candidates=5)
    images = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    nodes = torch.linspace(0, SIZE - 1, SIZE // 8).long()  # layer2's 8 x 8 grid, corners aligned
    with torch.no_grad():
        theirs = model(IMAGENET.from_unit(images)).anomaly_map.reshape(SIZE, SIZE)[nodes][:, nodes].flatten()
        ours = scorer.embed(images)[0, 0][nodes][:, nodes].flatten()
    order = torch.argsort(ours)
    assert torch.all(theirs[order][1:] >= theirs[order][:-1] - 1e-6)  # the same ranking of every position
    assert ours.std() > 0


def test_a_map_without_gradient_is_refused_naming_the_model_and_the_reason() -> None:
    class DetachedMap(nn.Module):  # stands for an anomalib model whose forward detaches its map
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 1, 3, padding=1)

        def forward(self, images: torch.Tensor) -> object:
            return type("Output", (), {"anomaly_map": self.conv(images).detach()})()

    DetachedMap.__module__ = "anomalib.models.image.example"
    with pytest.raises(MissingScorerError, match="cannot refine DetachedMap: no gradient reaches the pixels"):
        build_scorer(DetachedMap(), IMAGENET, num_candidates=5).check_differentiable((SIZE, SIZE))


def test_models_f2pad_cannot_refine_are_refused_with_the_reason() -> None:
    """Image scores only (DFKDE's kind), tiled (features of tiles, not of the image) and video models."""

    class ImageScoresOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 1, 3)

        def forward(self, images: torch.Tensor) -> InferenceBatch:
            return InferenceBatch(pred_score=self.conv(images).mean((1, 2, 3)))

    ImageScoresOnly.__module__ = "anomalib.models.image.example"
    with pytest.raises(MissingScorerError, match="cannot refine ImageScoresOnly: .*no anomaly map"):
        build_scorer(ImageScoresOnly(), IMAGENET, num_candidates=5).check_differentiable((SIZE, SIZE))

    tiled = tiny_fastflow()
    tiled.tiler = Tiler(tile_size=32, stride=32)
    with pytest.raises(MissingScorerError, match="cannot refine a tiled FastflowModel"):
        scorer_class_for(tiled)

    class ClipModel(ImageScoresOnly):
        pass

    ClipModel.__module__ = "anomalib.models.video.example.torch_model"
    with pytest.raises(MissingScorerError, match="cannot refine the video model ClipModel"):
        scorer_class_for(ClipModel())


def cut_paste_dataset(root: Path, defects: int = 6) -> Path:
    """The 60 normal training images and ``defects`` cut-paste test images (flat colour in a real defect's shape)."""
    source = EMBEDDED_ROOT / "brick"
    category = root / "brick"
    for folder in ("train/good", "test/good", "test/cut_paste", "ground_truth/cut_paste"):
        (category / folder).mkdir(parents=True)
    for path in sorted((source / "train/good").glob("*.png")):
        Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR).save(category / "train/good" / path.name)
    normals = sorted((source / "test/good").glob("*.png"))
    masks = sorted((source / "ground_truth").glob("*/*_mask.png"))
    for index in range(defects):
        normal = np.asarray(Image.open(normals[index % len(normals)]).convert("RGB").resize((SIZE, SIZE))) / 255
        mask = np.asarray(Image.open(masks[(3 * index) % len(masks)]).convert("L").resize((SIZE, SIZE))) > 127
        image = np.where(mask[..., None], np.array(COLOURS[index % len(COLOURS)]), normal)
        Image.fromarray((255 * image).astype(np.uint8)).save(category / "test/cut_paste" / f"{index:03d}.png")
        Image.fromarray(255 * mask.astype(np.uint8)).save(category / "ground_truth/cut_paste" / f"{index:03d}_mask.png")
    Image.open(normals[-1]).convert("RGB").resize((SIZE, SIZE)).save(category / "test/good" / "000.png")
    return root


MODELS = {  # model class, its arguments, training epochs, defective test images
    "Fastflow": (Fastflow, {"backbone": "resnet18", "pre_trained": False, "flow_steps": 2}, 2, 6),
    "ReverseDistillation": (ReverseDistillation, {"backbone": "resnet18", "pre_trained": False}, 6, 6),
    # DRAEM's anomaly source: the embedded grass images instead of DTD (a download). Its network is the costliest
    # to train and to refine through (about 30 s an epoch, 14 s an image here), so one epoch and three defects:
    # measured 5.5 -> 26.7 IoU (fit + test 89 s), against 4.1 -> 12.5 with two epochs and six (151 s).
    "Draem": (Draem, {"dtd_dir": EMBEDDED_ROOT / "grass" / "train" / "good"}, 1, 3),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_engine_test_refines_a_model_without_scorer(name: str, tmp_path: Path) -> None:
    """Fit, validate (F1-optimal pixel threshold) and test: F2PAD's IoU beats the backbone's mask."""
    seed_everything(0)
    model_class, arguments, epochs, defects = MODELS[name]
    model = model_class(**arguments, pre_processor=model_class.configure_pre_processor(image_size=(SIZE, SIZE)))
    model.post_processor = F2PAD(dilation=3, crop_margin=16, reach=8, max_iterations=30, reestimation_iterations=10)
    metrics = [
        metric(fields=[field, "gt_mask"], prefix=prefix)
        for field, prefix in (("initial_mask", "backbone_"), ("pred_mask", "f2pad_"))
        for metric in (IoU, Dice)
    ]
    model.evaluator = Evaluator(val_metrics=[], test_metrics=metrics)
    data = MVTecAD(root=cut_paste_dataset(tmp_path / "data", defects), category="brick", train_batch_size=8,
                   eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=tmp_path / "results", logger=False, enable_progress_bar=False, max_epochs=epochs)
    engine.fit(model, datamodule=data)
    result = engine.test(model, datamodule=data, verbose=False)[0]
    assert result["f2pad_IoU"] > result["backbone_IoU"] + 0.05, result
