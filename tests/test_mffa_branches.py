"""MFFA's maths on toy inputs: LGFFP, the NNS and Gaussian branches, AMC, PSG, switches and bad input."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_mlff.models.mffa import MFFAModel
from anomalib_mlff.models.mffa import lgffp as lgffp_module
from anomalib_mlff.models.mffa.anomaly_map import AnomalyMapGenerator, blur_kernel_size
from anomalib_mlff.models.mffa.gaussian import GaussianBranch
from anomalib_mlff.models.mffa.lgffp import LGFFP, BlockedTalkingHeadsAttention
from anomalib_mlff.models.mffa.loss import PSGLoss
from anomalib_mlff.models.mffa.nns import NNSBranch
from anomalib_mlff.models.mffa.psg import pseudo_sample_batch

IMAGE_SIZE = 64
CAIT = "cait_xxs24_224"  # 192 wide = resnet18 layer1 + layer2 (64 + 128)


def tiny_model(**overrides: object) -> MFFAModel:
    settings = {
        "backbone": "resnet18",
        "pre_trained": False,
        "cait_backbone": CAIT,
        "n_gaussian_features": 24,
        "coreset_ratio": 1.0,
    }
    settings.update(overrides)
    return MFFAModel(**settings).eval()


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fitted() -> MFFAModel:
    model = tiny_model()
    with torch.no_grad():
        model.fit(model.embed(images(4)))
    return model


# ----------------------------------------------------------------------------- LGFFP
def test_lgffp_is_fused_features_plus_resampled_positions_through_cait_blocks() -> None:
    generator = torch.Generator().manual_seed(0)
    lgffp = LGFFP(64, 128, 256, CAIT, 3, pre_trained=False, cait_weights_path=None, generator=generator).eval()
    shallow, middle, deep = torch.randn(2, 64, 16, 16), torch.randn(2, 128, 8, 8), torch.randn(2, 256, 4, 4)
    index = lgffp.deep_channel_index
    assert index.shape == (192,) and len(set(index.tolist())) == 192 and int(index.max()) < 256

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)

    fused = torch.cat([shallow, up(middle)], 1) + up(deep[:, index])
    torch.testing.assert_close(lgffp.fuse(shallow, middle, deep, (16, 16)), fused)
    assert lgffp.pos_grid == (14, 14)
    grid_pos = lgffp.pos_embed.reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=(16, 16), mode="bicubic", align_corners=False)
    tokens = fused.flatten(2).transpose(1, 2) + grid_pos.flatten(2).transpose(1, 2)
    for block in lgffp.blocks:
        tokens = block(tokens)
    expected = tokens.transpose(1, 2).reshape(2, 192, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(lgffp(shallow, middle, deep, (16, 16)), expected)
    assert len(lgffp.blocks) == 3
    assert not any(p.requires_grad for p in lgffp.parameters())


@pytest.mark.parametrize("block_bytes", [4 * 2**20, 4 * 100 * 4 * 7])  # one block; 7 query rows a block
def test_blocked_attention_is_timms_talking_heads_attention(monkeypatch: pytest.MonkeyPatch, block_bytes: int) -> None:
    """Same function as timm's ``TalkingHeadAttn`` (non-zero head-mixing biases included), same parameters."""
    monkeypatch.setattr(lgffp_module, "CPU_BLOCK_BYTES", block_bytes)
    timm_attention = timm.create_model(CAIT, pretrained=False).blocks[0].attn.eval()
    with torch.no_grad():
        for mixing in (timm_attention.proj_l, timm_attention.proj_w):
            mixing.weight.normal_()
            mixing.bias.normal_()
    blocked = BlockedTalkingHeadsAttention(timm_attention)
    assert blocked.state_dict().keys() == timm_attention.state_dict().keys()
    tokens = torch.randn(3, 100, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = timm_attention(tokens)
        torch.testing.assert_close(blocked(tokens), expected, rtol=1e-5, atol=1e-5)
        traced = torch.jit.trace(blocked, tokens[:1])  # the graph path: one block, any batch size
        torch.testing.assert_close(traced(tokens), expected, rtol=1e-5, atol=1e-5)


def test_lgffp_runs_its_cait_attention_blocked() -> None:
    generator = torch.Generator().manual_seed(0)
    lgffp = LGFFP(64, 128, 256, CAIT, 2, pre_trained=False, cait_weights_path=None, generator=generator)
    assert all(isinstance(block.attn, BlockedTalkingHeadsAttention) for block in lgffp.blocks)
    assert "blocks.0.attn.proj_l.weight" in lgffp.state_dict()  # timm's keys: CaiT checkpoints still load


def test_cait_of_the_wrong_width_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"(?s)cait_s24_224.*384 wide.*192.*cait_xxs24_224"):
        tiny_model(cait_backbone="cait_s24_224")
    with pytest.raises(ValueError, match="not a timm CaiT"):
        tiny_model(cait_backbone="resnet18")
    with pytest.raises(ValueError, match="only 24 transformer blocks"):
        tiny_model(cait_blocks=30)


# ----------------------------------------------------------------------------- Gaussian branch
def test_gaussian_branch_gives_the_mahalanobis_distance_with_lambda_regularisation() -> None:
    generator = torch.Generator().manual_seed(1)
    branch = GaussianBranch(in_channels=7, n_features=4, generator=generator)
    assert sorted(set(branch.feature_index.tolist())) == sorted(branch.feature_index.tolist())
    train = torch.randn(12, 7, 2, 3, generator=generator)
    test = torch.randn(2, 7, 2, 3, generator=generator)
    branch.fit(branch.select(train))
    scores = branch(branch.select(test))
    assert scores.shape == (2, 1, 2, 3)
    selected_train, selected_test = train[:, branch.feature_index], test[:, branch.feature_index]
    for row in range(2):
        for col in range(3):
            samples = selected_train[:, :, row, col]
            covariance = torch.cov(samples.T) + 0.01 * torch.eye(4)
            delta = selected_test[:, :, row, col] - samples.mean(0)
            expected = torch.einsum("bi,ij,bj->b", delta, torch.linalg.inv(covariance), delta).sqrt()
            torch.testing.assert_close(scores[:, 0, row, col], expected, rtol=2e-3, atol=1e-5)


def test_gaussian_branch_needs_two_images() -> None:
    branch = GaussianBranch(in_channels=5, n_features=3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="at least 2 training images"):
        branch.fit(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"n_gaussian_features must be an integer in \[1, 5\]"):
        GaussianBranch(in_channels=5, n_features=6, generator=torch.Generator())


# ----------------------------------------------------------------------------- NNS branch
def test_nns_branch_pools_concatenates_and_scores_the_nearest_bank_entry() -> None:
    branch = NNSBranch(coreset_ratio=1.0)
    generator = torch.Generator().manual_seed(2)
    middle, deep = torch.randn(3, 8, 6, 6, generator=generator), torch.randn(3, 4, 3, 3, generator=generator)
    embedding = branch.embed(middle, deep)
    pooled_deep = F.interpolate(F.avg_pool2d(deep, 3, 1, 1), size=(6, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(embedding, torch.cat([F.avg_pool2d(middle, 3, 1, 1), pooled_deep], 1))
    train, test = embedding[:2], embedding[2:]
    branch.fit(train)
    torch.testing.assert_close(branch(train), torch.zeros(2, 1, 6, 6), atol=3e-3, rtol=0)  # sqrt of ~0
    bank = train.permute(0, 2, 3, 1).reshape(-1, 12)
    expected = torch.cdist(test.permute(0, 2, 3, 1).reshape(-1, 12), bank).amin(1).reshape(1, 1, 6, 6)
    torch.testing.assert_close(branch(test), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- whole model and AMC
def test_embeddings_have_the_branch_shapes(fitted: MFFAModel) -> None:
    with torch.no_grad():
        embeddings = fitted.embed(images(2, seed=5))
    assert embeddings.nns.shape == (2, 128 + 256, 8, 8)  # layer2 grid, layer2 + layer3 channels
    assert embeddings.gaussian.shape == (2, 24, 16, 16)  # layer1 grid, selected dimensions


def test_amc_map_is_the_smoothed_product_of_the_branch_maps(fitted: MFFAModel) -> None:
    batch = images(2, seed=6)
    with torch.no_grad():
        nns_map, gaussian_map = fitted.branch_maps(batch)
        output = fitted(batch)
    assert nns_map.shape == gaussian_map.shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert float(nns_map.min()) >= 0 and float(gaussian_map.min()) > 0
    torch.testing.assert_close(output.anomaly_map, fitted.anomaly_map_generator.smooth(nns_map * gaussian_map))
    torch.testing.assert_close(output.pred_score, output.anomaly_map.amax(dim=(1, 2, 3)))


def test_without_blur_the_map_is_exactly_the_product() -> None:
    maps = [torch.rand(2, 1, 40, 40), torch.rand(2, 1, 40, 40)]
    assert torch.equal(AnomalyMapGenerator(sigma=0)(maps), maps[0] * maps[1])
    assert blur_kernel_size(4.0) == 33
    blurred = AnomalyMapGenerator(sigma=4)(maps)
    assert not torch.equal(blurred, maps[0] * maps[1])
    torch.testing.assert_close(blurred.mean(), (maps[0] * maps[1]).mean(), atol=0.02, rtol=0)
    assert blurred.std() < 0.5 * (maps[0] * maps[1]).std()
    small = AnomalyMapGenerator(sigma=4)([torch.rand(1, 1, 8, 8)])  # kernel shrinks to fit the map
    assert small.shape == (1, 1, 8, 8)


@pytest.mark.parametrize(("use_nns", "use_gaussian"), [(True, False), (False, True)])
def test_single_branch_ablations_use_that_branch_alone(use_nns: bool, use_gaussian: bool) -> None:
    model = tiny_model(use_nns=use_nns, use_gaussian=use_gaussian, use_psg=False)
    assert (model.nns is not None, model.gaussian is not None) == (use_nns, use_gaussian)
    with torch.no_grad():
        model.fit(model.embed(images(3)))
        (branch_map,) = model.branch_maps(images(1, seed=9))
        output = model(images(1, seed=9))
    torch.testing.assert_close(output.anomaly_map, model.anomaly_map_generator.smooth(branch_map))


def test_without_lgffp_the_gaussian_uses_the_padim_concatenation() -> None:
    model = tiny_model(use_lgffp=False, n_gaussian_features=300)
    assert model.lgffp is None
    assert int(model.gaussian.feature_index.max()) < 64 + 128 + 256
    with torch.no_grad():
        features = model.feature_extractor(images(1))
        embedding = model.embed_features(features).gaussian
    shallow, middle, deep = (features[layer] for layer in model.layers)

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)

    expected = torch.cat([shallow, up(middle), up(deep)], 1)[:, model.gaussian.feature_index]
    torch.testing.assert_close(embedding, expected)


def test_random_selections_are_buffers_fixed_by_the_seed() -> None:
    first, again, other = tiny_model(seed=3), tiny_model(seed=3), tiny_model(seed=4)
    keys = ("lgffp.deep_channel_index", "gaussian.feature_index")
    state = first.state_dict()
    for key in keys:
        assert key in state
        assert torch.equal(state[key], again.state_dict()[key])
        assert not torch.equal(state[key], other.state_dict()[key])


def test_grid_layer_two_runs_lgffp_and_the_gaussian_at_layer2() -> None:
    model = tiny_model(grid_layer="layer2")
    with torch.no_grad():
        assert model.embed(images(1)).gaussian.shape[-2:] == (8, 8)
    with pytest.raises(ValueError, match="grid_layer must be one of the first two layers"):
        tiny_model(grid_layer="layer3")


# ----------------------------------------------------------------------------- PSG
def test_pseudo_sample_batch_holds_normal_cutpaste_and_scar_images() -> None:
    clean = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    batch, labels = pseudo_sample_batch(clean, torch.Generator().manual_seed(1))
    assert batch.shape == (12, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(batch[:4], clean)
    changed = (batch[4:] != clean.repeat(2, 1, 1, 1)).flatten(1).any(1)
    assert bool(changed.all())
    again, _ = pseudo_sample_batch(clean, torch.Generator().manual_seed(1))
    assert torch.equal(batch, again)


@pytest.mark.slow
def test_psg_fine_tuning_lowers_the_classification_loss() -> None:
    """The backbone and classifier MFFA trains, with its SGD settings but a larger step, on one tiny batch."""
    torch.manual_seed(0)
    model = tiny_model(use_gaussian=False).train()
    clean = torch.rand(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    batch, labels = pseudo_sample_batch(clean, torch.Generator().manual_seed(1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in model.feature_extractor.parameters()} <= {id(p) for p in trainable}
    optimizer = torch.optim.SGD(trainable, lr=0.05, momentum=0.9, weight_decay=3e-5)
    loss_fn = PSGLoss()
    losses = []
    for _ in range(12):
        loss = loss_fn(model(batch), labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# ----------------------------------------------------------------------------- bad input
def test_bad_images_are_clear_errors(fitted: MFFAModel) -> None:
    with pytest.raises(ValueError, match="RGB"):
        fitted(torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(ValueError, match="too small"):
        fitted(torch.zeros(1, 3, 16, 16))
    nan_images = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    nan_images[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fitted(nan_images)
    with pytest.raises(ValueError, match=r"fitted on 256 grid positions.*training image size"):
        fitted(torch.zeros(1, 3, 96, 96))


def test_unfitted_model_and_impossible_switches_are_clear_errors() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        tiny_model()(images(1))
    with pytest.raises(ValueError, match="At least one of use_nns and use_gaussian"):
        tiny_model(use_nns=False, use_gaussian=False)
    with pytest.raises(RuntimeError, match="use_psg=False"):
        tiny_model(use_psg=False).train()(images(1))
