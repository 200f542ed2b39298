"""MLFFModel: shapes in both modes, ablation switches, input checks, training signal, ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import InferenceBatch

from anomalib_mlff.components.pseudo_anomaly import PseudoAnomalyGenerator
from anomalib_mlff.models.mlff.loss import MLFFLoss
from anomalib_mlff.models.mlff.torch_model import MLFFModel, MLFFOutput

SIZE = 64
TINY = {"backbone": "resnet18", "pre_trained": False, "feature_dim": 16, "tem_levels": 8, "ptfem_levels": 4}


def tiny_model(**overrides: object) -> MLFFModel:
    torch.manual_seed(0)
    return MLFFModel(**{**TINY, **overrides})


def images(batch: int = 2, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> MLFFModel:
    return tiny_model()


def test_train_mode_returns_features_and_scores_at_stride_4(model: MLFFModel) -> None:
    model.train()
    output = model(images())
    assert isinstance(output, MLFFOutput)
    assert output.features.shape == (2, 16, SIZE // 4, SIZE // 4)
    assert output.scores.shape == (2, 1, SIZE // 4, SIZE // 4)


def test_eval_mode_returns_upsampled_map_and_max_score(model: MLFFModel) -> None:
    model.eval()
    with torch.no_grad():
        output = model(images())
        _, scores = model.extract_features(images())
    assert isinstance(output, InferenceBatch)
    assert output.anomaly_map.shape == (2, 1, SIZE, SIZE)
    assert output.pred_score.shape == (2,)
    torch.testing.assert_close(output.pred_score, output.anomaly_map.amax(dim=(1, 2, 3)))
    # Bilinear upsampling of the head's scores (Eq. 9): same values at the coarse grid's range.
    assert output.anomaly_map.max() <= scores.max() + 1e-6 and output.anomaly_map.min() >= scores.min() - 1e-6


def test_without_score_head_the_map_is_the_pseudo_huber_distance() -> None:
    model = tiny_model(use_score_head=False).eval()
    with torch.no_grad():
        features, scores = model.extract_features(images())
        output = model(images())
    assert scores is None
    expected = torch.nn.functional.interpolate(
        torch.sqrt(features.pow(2).sum(1, keepdim=True) + 1) - 1, size=(SIZE, SIZE), mode="bilinear"
    )
    torch.testing.assert_close(output.anomaly_map, expected, atol=1e-5, rtol=1e-5)
    model.train()
    assert model(images()).scores is None


@pytest.mark.parametrize(("use_stl", "use_scconv"), [(False, False), (True, False), (False, True)])
def test_ablation_switches(use_stl: bool, use_scconv: bool) -> None:
    model = tiny_model(use_stl=use_stl, use_scconv=use_scconv)
    assert (model.texture is not None) == use_stl
    assert (model.semantic is not None) == use_scconv
    output = model.train()(images())
    assert output.features.shape == (2, 16, SIZE // 4, SIZE // 4)
    if not use_stl and not use_scconv:
        # Baseline: layers 1-3 (64 + 128 + 256 channels for resnet18) fused directly by the 1x1 fusion.
        assert model.fusion[0][0].in_channels == 64 + 128 + 256
        assert model.size_multiple == 16


def test_freeze_backbone_stops_its_gradients() -> None:
    model = tiny_model(freeze_backbone=True)
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    assert all(p.requires_grad for p in model.fusion.parameters())


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.randn(3, SIZE, SIZE), "images"),
        (torch.randn(1, 1, SIZE, SIZE), "3 channels"),
        (torch.randn(1, 3, 48, 48), "multiples of 32 and at least 64"),
        (torch.randn(1, 3, 80, 64), "multiples of 32"),
    ],
)
def test_bad_images_raise_value_errors(model: MLFFModel, bad: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model(bad)


def test_nan_images_and_nan_features_are_named(model: MLFFModel) -> None:
    bad = images()
    bad[0, 1, 5, 5] = float("inf")
    with pytest.raises(ValueError, match="images.*NaN or inf"):
        model(bad)
    broken = tiny_model()
    with torch.no_grad():
        broken.fusion[1].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="psi"):
        broken(images())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"backbone": "no_such_net"}, "backbone"),
        ({"layers": ("layer1", "layer2", "layer9")}, "layers"),
        ({"layers": ("layer1", "layer2")}, "layers"),
        ({"layers": ("layer3", "layer2", "layer1")}, "layers"),
        ({"feature_dim": 0}, "feature_dim"),
        ({"tem_levels": 0}, "tem_levels"),
        ({"ptfem_scales": ()}, "ptfem_scales"),
    ],
)
def test_bad_settings_raise_value_errors(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        tiny_model(**kwargs)


def test_a_few_optimisation_steps_lower_the_loss() -> None:
    model = tiny_model().train()
    loss = MLFFLoss()
    clean = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    corrupted, masks = PseudoAnomalyGenerator(ratio=0.5)(clean, torch.Generator().manual_seed(0))
    assert masks.sum() > 0
    normalised = (corrupted - 0.45) / 0.225
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(6):
        output = model(normalised)
        losses = loss(output.features, output.scores, masks)
        optimiser.zero_grad()
        losses["loss"].backward()
        optimiser.step()
        history.append({key: value.item() for key, value in losses.items()})
    assert all(np.isfinite(list(step.values())).all() for step in history)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["feature_loss"] < history[0]["feature_loss"]


class _Outputs(torch.nn.Module):
    """InferenceBatch as a plain tuple, as exporters want."""

    def __init__(self, model: MLFFModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(batch)
        return output.pred_score, output.anomaly_map


def test_onnx_export_runs_in_openvino_and_matches_torch(tmp_path: Path) -> None:
    import openvino as ov

    model = tiny_model().eval()
    batch = images()
    path = tmp_path / "mlff.onnx"
    torch.onnx.export(_Outputs(model), (batch,), str(path), dynamo=True, opset_version=18, verbose=False)
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(batch.numpy())
    with torch.no_grad():
        expected = model(batch)
    np.testing.assert_allclose(result[0], expected.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(result[1], expected.anomaly_map.numpy(), atol=1e-4)
