"""STLNet texture modules (quantisation, TEM, PTFEM) and the self-calibrated convolution."""

from __future__ import annotations

import pytest
import torch

from anomalib_mlff.components.scconv import SelfCalibratedConv
from anomalib_mlff.components.texture import (
    CooccurrenceDescriptor,
    PyramidTextureExtraction,
    TextureEnhancement,
    cosine_to_mean,
    quantise,
)


def test_quantise_levels_encoding_and_histogram_by_hand() -> None:
    similarity = torch.tensor([[0.0, 0.3, 0.55, 1.0]])
    quant = quantise(similarity, num_levels=4)
    # Level centres at (2n+1)/(2N) of the range [0, 1].
    torch.testing.assert_close(quant.levels, torch.tensor([[0.125, 0.375, 0.625, 0.875]]))
    # Each pixel sits on its own bin with weight 1 - |L_n - S_i|.
    expected = torch.diag(torch.tensor([1 - 0.125, 1 - 0.075, 1 - 0.075, 1 - 0.125]))
    torch.testing.assert_close(quant.encoding[0], expected)
    torch.testing.assert_close(quant.histogram[0], expected.sum(dim=1) / expected.sum())


def test_quantise_levels_follow_the_range_of_each_row() -> None:
    similarity = torch.tensor([[-0.5, 0.5, 0.1], [2.0, 4.0, 3.0]])
    quant = quantise(similarity, num_levels=2)
    torch.testing.assert_close(quant.levels, torch.tensor([[-0.25, 0.25], [2.5, 3.5]]))


def test_histograms_sum_to_one_and_every_pixel_has_one_level() -> None:
    similarity = torch.randn(3, 200, generator=torch.Generator().manual_seed(0))
    quant = quantise(similarity, num_levels=16)
    torch.testing.assert_close(quant.histogram.sum(dim=1), torch.ones(3))
    assert torch.equal((quant.encoding > 0).sum(dim=1), torch.ones(3, 200, dtype=torch.long))


def test_constant_maps_give_no_nan() -> None:
    quant = quantise(torch.full((2, 10), 0.7), num_levels=8)
    assert torch.isfinite(quant.encoding).all() and torch.isfinite(quant.levels).all()
    torch.testing.assert_close(quant.histogram, torch.tensor([[1.0] + [0.0] * 7] * 2))

    constant = torch.ones(2, 8, 8, 8, requires_grad=True)
    zeros = torch.zeros(2, 8, 8, 8, requires_grad=True)
    for features in (constant, zeros):
        tem = TextureEnhancement(8, levels=16)(features)
        ptfem = PyramidTextureExtraction(8, levels=4, scales=(1, 2, 4))(features)
        (tem.sum() + ptfem.sum()).backward()
        assert torch.isfinite(tem).all() and torch.isfinite(ptfem).all()
        assert torch.isfinite(features.grad).all()


def test_cosine_to_mean() -> None:
    features = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # two pixels: (1, 0) and (0, 1)
    # mean (0.5, 0.5): cosine sqrt(0.5) for both pixels
    torch.testing.assert_close(cosine_to_mean(features), torch.full((1, 2), 0.5**0.5))


def test_cooccurrence_counts_neighbour_pairs_by_hand() -> None:
    # 2 levels on a 2x2 map [[0, 1], [1, 1]], unit weights.
    levels = torch.tensor([[0, 1], [1, 1]])
    encoding = torch.stack([(levels == 0), (levels == 1)]).float().unsqueeze(0)  # (1, 2, 2, 2)
    # horizontal pairs (0,1), (1,1); vertical pairs (0,1), (1,1) -> counts [[0, 2], [0, 2]] / 4
    expected = torch.tensor([[[0.0, 0.5], [0.0, 0.5]]])
    torch.testing.assert_close(CooccurrenceDescriptor.cooccurrence(encoding), expected)


def test_tem_and_ptfem_shapes() -> None:
    features = torch.randn(2, 12, 16, 16)
    assert TextureEnhancement(12, levels=32)(features).shape == (2, 12, 16, 16)
    assert PyramidTextureExtraction(12, levels=8, scales=(1, 2, 4, 8))(features).shape == (2, 12, 16, 16)
    assert CooccurrenceDescriptor(12, levels=8)(features).shape == (2, 12)


def test_tem_output_depends_on_the_quantised_level() -> None:
    """Pixels on the same level get the same feature up to their encoding weight (R = D' E)."""
    torch.manual_seed(0)
    tem = TextureEnhancement(4, levels=2).eval()
    features = torch.zeros(1, 4, 1, 4)
    features[0, 0] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    features[0, 1] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    output = tem(features)[0, :, 0]
    torch.testing.assert_close(output[:, 0], output[:, 1])
    torch.testing.assert_close(output[:, 2], output[:, 3])


def test_ptfem_rejects_maps_not_divisible_by_the_scales() -> None:
    with pytest.raises(ValueError, match="ptfem_scales"):
        PyramidTextureExtraction(4, levels=4, scales=(1, 3))(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="scales"):
        PyramidTextureExtraction(4, scales=())


def test_scconv_keeps_shape_and_widens_the_receptive_field() -> None:
    torch.manual_seed(0)
    block = SelfCalibratedConv(6, pooling_rate=4).eval()
    features = torch.randn(1, 6, 32, 32, requires_grad=True)
    output = block(features)
    assert output.shape == features.shape
    output[0, :, 16, 16].sum().backward()
    # K3 and K4 alone see 5x5 around (16, 16). The gate at columns 15-17 pools blocks 3-4 (columns
    # 12-19) and K2 adds one block each side: columns 8-23 reach the output, 28 does not.
    assert features.grad[0, :, 16, 22].abs().sum() > 0
    assert features.grad[0, :, 16, 28].abs().sum() == 0


def test_scconv_rejects_maps_smaller_than_the_pooling_rate() -> None:
    with pytest.raises(ValueError, match="pooling_rate"):
        SelfCalibratedConv(4, pooling_rate=4)(torch.randn(1, 4, 3, 8))
