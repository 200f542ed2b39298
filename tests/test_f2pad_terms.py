"""F2PAD's terms, optimiser pieces and metrics on toy inputs: values and gradients by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from anomalib_mlff import Dice, IoU
from anomalib_mlff.post_processing.f2pad.objective import channel_norm, log_sparsity, smoothness
from anomalib_mlff.post_processing.f2pad.optimizer import GradientSharing, share_gradients, step_scale
from anomalib_mlff.post_processing.f2pad.prior import PixelPrior
from anomalib_mlff.post_processing.f2pad.window import FeatureWindow, dilate, positions_touched


def test_log_sparsity_value_and_gradient() -> None:
    eps = 0.1
    part = torch.zeros(1, 3, 1, 3, dtype=torch.float64)
    part[0, :, 0, 0] = torch.tensor([0.3, 0.4, 0.0])  # |a| = 0.5
    part[0, :, 0, 1] = torch.tensor([0.0, 0.0, -0.2])  # |a| = 0.2
    part[0, :, 0, 2] = torch.tensor([1.0, 0.0, 0.0])  # outside the region
    region = torch.tensor([[[True, True, False]]])
    part.requires_grad_(True)
    value = log_sparsity(part, region.to(part.dtype), eps)
    expected = torch.log1p(torch.tensor(0.5 / eps)) + torch.log1p(torch.tensor(0.2 / eps))
    torch.testing.assert_close(value, expected.double().reshape(1))
    (gradient,) = torch.autograd.grad(value.sum(), part)
    # d/da log(1 + |a|/eps) = a / (|a| (eps + |a|))
    torch.testing.assert_close(gradient[0, :, 0, 0], part[0, :, 0, 0].detach() / (0.5 * (eps + 0.5)))
    torch.testing.assert_close(gradient[0, :, 0, 1], part[0, :, 0, 1].detach() / (0.2 * (eps + 0.2)))
    assert torch.all(gradient[0, :, 0, 2] == 0)


def test_log_sparsity_gradient_is_finite_at_zero() -> None:
    part = torch.zeros(1, 3, 2, 2, requires_grad=True)
    (gradient,) = torch.autograd.grad(log_sparsity(part, torch.ones(1, 2, 2), 0.05).sum(), part)
    assert torch.isfinite(gradient).all()


def test_total_variation_value_and_gradient() -> None:
    image = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]]], requires_grad=True)
    value = smoothness(image)
    # |1-0| + |0.25-0.5| horizontally, |0.5-0| + |0.25-1| vertically
    torch.testing.assert_close(value, torch.tensor([1.0 + 0.25 + 0.5 + 0.75]))
    (gradient,) = torch.autograd.grad(value.sum(), image)
    # each pixel: sum of signs of (pixel - neighbour) over its two neighbours
    torch.testing.assert_close(gradient, torch.tensor([[[[-2.0, 2.0], [2.0, -2.0]]]]))


def two_cluster_prior() -> PixelPrior:
    prior = PixelPrior()
    prior.means = torch.tensor([[0.2, 0.2, 0.2], [0.8, 0.6, 0.4]])
    prior.precisions = torch.stack([torch.eye(3) * 100, torch.diag(torch.tensor([25.0, 50.0, 100.0]))])
    return prior


def test_prior_is_nearest_component_mahalanobis_with_its_gradient() -> None:
    prior = two_cluster_prior()
    pixels = torch.tensor([[0.25, 0.2, 0.1], [0.8, 0.7, 0.5]]).T.reshape(1, 3, 1, 2).requires_grad_(True)
    value = prior(pixels)
    first = 100 * (0.05**2 + 0 + 0.1**2)
    second = 25 * 0 + 50 * 0.1**2 + 100 * 0.1**2
    torch.testing.assert_close(value, torch.tensor([[[first, second]]]))
    (gradient,) = torch.autograd.grad(value.sum(), pixels)
    # 2 P_k (x - mu_k) of the nearest component
    torch.testing.assert_close(gradient[0, :, 0, 0], 2 * 100 * torch.tensor([0.05, 0.0, -0.1]))
    torch.testing.assert_close(gradient[0, :, 0, 1], 2 * torch.tensor([25 * 0.0, 50 * 0.1, 100 * 0.1]))


def test_prior_fit_finds_both_colours_and_weighs_them_equally() -> None:
    generator = torch.Generator().manual_seed(0)
    common = torch.tensor([0.3, 0.3, 0.3]) + 0.02 * torch.randn(1800, 3, generator=generator)
    rare = torch.tensor([0.9, 0.5, 0.1]) + 0.02 * torch.randn(200, 3, generator=generator)
    prior = PixelPrior(n_components=4, reg_covar=1e-4).fit(torch.cat([common, rare]))
    nearest = lambda colour: (prior.means - torch.tensor(colour)).norm(dim=1).min()  # noqa: E731
    assert nearest([0.3, 0.3, 0.3]) < 0.02
    assert nearest([0.9, 0.5, 0.1]) < 0.02
    costs = prior(torch.tensor([[0.3, 0.3, 0.3], [0.9, 0.5, 0.1], [0.6, 0.9, 0.6]]).T.reshape(1, 3, 1, 3))[0, 0]
    # the rare colour costs as little as the common one (no mixture weights), an unseen colour a lot more
    assert costs[1] < 5 and costs[0] < 5
    assert costs[2] > 100 * max(costs[0], costs[1])


def test_prior_round_trips_through_plain_data() -> None:
    fitted = two_cluster_prior()
    restored = PixelPrior()
    restored.load_config(fitted.to_config())
    assert restored.is_fitted
    torch.testing.assert_close(restored.means, fitted.means)


def test_sharing_weights_sum_to_one_over_free_neighbours() -> None:
    generator = torch.Generator().manual_seed(0)
    guidance = torch.rand(2, 3, 12, 12, generator=generator)
    region = torch.zeros(2, 12, 12, dtype=torch.bool)
    region[:, 2:9, 3:11] = True
    constant = torch.full((2, 3, 12, 12), 0.7)
    shared = share_gradients(constant, guidance, region, kernel_size=5, sigma_space=1.0, sigma_color=0.25)
    # a weighted mean of equal values with weights summing to 1 is that value, at the region's edges too
    torch.testing.assert_close(shared[region[:, None].expand_as(shared)], torch.full((2 * 3 * 7 * 8,), 0.7))
    assert torch.all(shared[~region[:, None].expand_as(shared)] == 0)


def test_sharing_as_a_sparse_product_equals_the_weighted_sum_over_reflected_taps() -> None:
    """The sparse matrix gives each free pixel the weighted sum of its free neighbours' gradients, as kornia's
    bilateral taps (reflected at the image border) do, for every image of a batch."""
    generator = torch.Generator().manual_seed(1)
    guidance = torch.rand(2, 3, 10, 13, generator=generator)
    gradient = torch.randn(2, 3, 10, 13, generator=generator)
    region = torch.rand(2, 10, 13, generator=generator) > 0.3  # touches every border
    sharing = GradientSharing(guidance, region, 5, 1.0, 0.25)
    dense = (sharing._taps(gradient * sharing.free) * sharing.weights).sum(2)  # noqa: SLF001
    torch.testing.assert_close(sharing(gradient), dense)
    assert not torch.equal(dense, gradient * sharing.free)  # sharing mixes neighbours


def test_sharing_weights_follow_the_colours_of_the_image() -> None:
    guidance = torch.zeros(1, 3, 8, 8)
    guidance[..., 4:] = 1.0  # two colour halves
    gradient = torch.where(torch.arange(8) < 4, 1.0, -1.0).expand(1, 3, 8, 8).clone()
    region = torch.ones(1, 8, 8, dtype=torch.bool)
    by_colour = share_gradients(gradient, guidance, region, 5, 1.0, 0.25)
    uniform = share_gradients(gradient, torch.zeros_like(guidance), region, 5, 1.0, 0.25)
    # next to the colour edge, sharing stays within the pixel's own colour
    assert by_colour[0, 0, 4, 3] > 0.99
    assert uniform[0, 0, 4, 3] < 0.7


def test_step_scale_is_largest_where_the_anomalous_part_vanishes() -> None:
    part = torch.zeros(1, 3, 1, 3)
    part[0, 0, 0, 1] = 0.05
    part[0, 0, 0, 2] = 10.0
    scale = step_scale(part, boost=3.0, eps=0.05)[0, 0, 0]
    torch.testing.assert_close(scale[:2], torch.tensor([4.0, 2.5]))
    assert 1.0 < scale[2] < 1.02


def test_window_crops_align_with_the_feature_grid_and_paste_back() -> None:
    regions = torch.zeros(2, 64, 64, dtype=torch.bool)
    regions[0, 40:50, 44:52] = True
    regions[1, 3:9, 5:20] = True
    window = FeatureWindow.around(regions, margin=8, alignment=16)
    assert window.size[0] < 64 and window.size[1] < 64
    assert torch.all(window.offsets % 16 == 0)
    # each region with its margin (clipped to the image) fits in its crop
    context = dilate(regions, 8)
    assert window.crop(context).sum() == context.sum()
    crops = window.crop(regions)
    torch.testing.assert_close(window.paste(crops, torch.zeros_like(regions)), regions)


def test_window_is_the_whole_image_when_the_size_is_not_aligned() -> None:
    regions = torch.zeros(1, 60, 60, dtype=torch.bool)
    regions[0, 10:12, 10:12] = True
    assert FeatureWindow.around(regions, margin=4, alignment=16).size == (60, 60)


def test_dilation_and_touched_positions() -> None:
    masks = torch.zeros(1, 16, 16, dtype=torch.bool)
    masks[0, 8, 8] = True
    assert dilate(masks, 2).sum() == 25
    touched = positions_touched(masks, stride=4, reach=0)
    assert touched.shape == (1, 4, 4) and touched.sum() == 1 and touched[0, 2, 2]


def test_iou_and_dice_average_over_images() -> None:
    pred = torch.zeros(3, 8, 8, dtype=torch.bool)
    truth = torch.zeros(3, 8, 8, dtype=torch.bool)
    pred[0, :4], truth[0, :2] = True, True  # IoU 1/2, DICE 2/3
    pred[1, :4], truth[1, :4] = True, True  # 1, 1
    # image 2: both empty, left out
    batch = SimpleNamespace(pred_mask=pred, gt_mask=truth)
    iou, dice = IoU(), Dice()
    iou.update(batch)
    dice.update(batch)
    assert iou.compute().item() == pytest.approx(0.75)
    assert dice.compute().item() == pytest.approx((2 / 3 + 1) / 2)


def test_channel_norm_equals_vector_norm_in_value_and_gradient_including_zero_pixels() -> None:
    images = torch.rand(2, 3, 12, 12, dtype=torch.float64) - 0.5
    images[0, :, :4] = 0  # pixels where A = 0: vector_norm's gradient is 0 there, not NaN
    ours, reference = (images.clone().requires_grad_(True) for _ in range(2))
    weights = torch.rand(2, 12, 12, dtype=torch.float64)
    (channel_norm(ours) * weights).sum().backward()
    (torch.linalg.vector_norm(reference, dim=1) * weights).sum().backward()
    torch.testing.assert_close(channel_norm(images), torch.linalg.vector_norm(images, dim=1))
    kept = torch.linalg.vector_norm(images, dim=1, keepdim=True)
    torch.testing.assert_close(channel_norm(images, keepdim=True), kept)
    torch.testing.assert_close(ours.grad, reference.grad)
    assert ours.grad[0, :, :4].eq(0).all()
