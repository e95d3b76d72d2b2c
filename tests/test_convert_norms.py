"""convert_model(norm=...) on a ResNet-style model: every normalization trains (loss falls),
round-trips through state_dict, reverts to plain torch modules with identical eval outputs;
GN+WS standardizes exactly the convolutions that feed a normalization, and says which."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distnorm
from distnorm.layers import (
    BatchChannelNorm,
    BatchGroupNorm,
    FrozenBatchNorm,
    SyncBatchNorm,
    WSConv2d,
)
from tests.models import BasicBlock


class TinyResNet(nn.Module):
    """A stem, two residual stages, a 1x1 conv feeding no norm, and a linear head."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.project = nn.Conv2d(32, 32, 1)  # feeds the pooling, not a norm: never standardized
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.stem(x))))
        return self.fc(self.project(x).mean(dim=(2, 3)))


CONVS_FEEDING_NORMS = {
    "stem.0",
    "layer1.conv1",
    "layer1.conv2",
    "layer2.conv1",
    "layer2.conv2",
    "layer2.downsample.0",
}
NORM_NAMES = {
    "stem.1",
    "layer1.bn1",
    "layer1.bn2",
    "layer2.bn1",
    "layer2.bn2",
    "layer2.downsample.1",
}
LAYER_OF = {
    "bn": nn.BatchNorm2d,
    "sync_bn": distnorm.SyncBatchNorm2d,
    "gn_ws": distnorm.layers.GroupNorm,
    "bcn": BatchChannelNorm,
    "bgn": BatchGroupNorm,
    "frozen_bn": distnorm.FrozenBatchNorm2d,
}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes told apart by which quadrant of the image is bright."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(16) % 4
    images = torch.randn(16, 3, 8, 8, generator=generator) * 0.5
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, :, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4] += 1.5
    return images, labels


def model_for(norm: str) -> nn.Module:
    torch.manual_seed(0)
    model = TinyResNet()
    if norm == "frozen_bn":  # FrozenBN is for BN-pretrained models: give it real statistics
        with torch.no_grad():
            for _ in range(10):
                model(data()[0])
    return distnorm.convert_model(model, norm=norm)


@pytest.mark.parametrize("norm", list(LAYER_OF))
def test_each_norm_trains_with_falling_loss(norm: str) -> None:
    model = model_for(norm)
    assert {n for n, m in model.named_modules() if type(m) is LAYER_OF[norm]} == NORM_NAMES
    images, labels = data()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.05, momentum=0.9)
    losses = []
    for step in range(20):
        batch = slice(8 * (step % 2), 8 * (step % 2) + 8)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4, losses


@pytest.mark.parametrize("norm", list(LAYER_OF))
def test_state_dict_round_trip_and_revert_keep_eval_outputs(norm: str) -> None:
    model = model_for(norm)
    images, _ = data()
    model.train()(images)  # move running statistics / estimates off their initial values
    model.eval()
    expected = model(images)

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    reloaded = model_for(norm).eval()
    reloaded.load_state_dict(torch.load(buffer), strict=True)
    assert torch.equal(reloaded(images), expected)

    reverted = distnorm.revert_model(copy.deepcopy(model))
    distnorm_classes = (SyncBatchNorm, FrozenBatchNorm, WSConv2d)
    assert not any(isinstance(m, distnorm_classes) for m in reverted.modules())
    torch.testing.assert_close(reverted(images), expected, rtol=1e-5, atol=1e-5)


def test_gn_ws_standardizes_exactly_the_convs_feeding_norms_and_reports_them() -> None:
    model = model_for("gn_ws")
    standardized = {n for n, m in model.named_modules() if isinstance(m, WSConv2d)}
    assert standardized == CONVS_FEEDING_NORMS
    report = distnorm.conversion_report(model)
    assert set(report.standardized_convs) == CONVS_FEEDING_NORMS
    assert "layer2.downsample.0" in str(report) and "WSConv2d" in str(report)
    assert type(model.project) is nn.Conv2d


def test_weight_standardization_can_be_turned_off() -> None:
    torch.manual_seed(0)
    model = distnorm.convert_model(TinyResNet(), norm="gn_ws", weight_standardization=False)
    assert not any(isinstance(m, WSConv2d) for m in model.modules())


def standardized_convs(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, WSConv2d)}


@pytest.mark.parametrize("norm", list(LAYER_OF))
def test_weight_standardization_by_default_with_gn_bcn_and_bgn(norm: str) -> None:
    expected = CONVS_FEEDING_NORMS if norm in ("gn_ws", "bcn", "bgn") else set()
    assert standardized_convs(model_for(norm)) == expected


@pytest.mark.parametrize("norm", ["bn", "sync_bn", "gn_ws", "bcn", "bgn"])
def test_weight_standardization_on_request_for_every_norm_that_learns_statistics(
    norm: str,
) -> None:
    torch.manual_seed(0)
    model = distnorm.convert_model(TinyResNet(), norm=norm, weight_standardization=True)
    assert standardized_convs(model) == CONVS_FEEDING_NORMS
    torch.manual_seed(0)
    plain = distnorm.convert_model(TinyResNet(), norm=norm, weight_standardization=False)
    assert standardized_convs(plain) == set()


def test_weight_standardization_is_refused_for_frozen_statistics() -> None:
    with pytest.raises(distnorm.ConversionError, match="frozen BatchNorm's statistics"):
        distnorm.convert_model(TinyResNet(), norm="frozen_bn", weight_standardization=True)


def test_group_norm_shares_the_batchnorms_affine_and_chooses_groups() -> None:
    torch.manual_seed(0)
    original = TinyResNet()
    weight = original.layer2.bn1.weight
    model = distnorm.convert_model(original, norm="gn_ws")
    assert model.layer2.bn1.weight is weight
    # 32 channels: 16 groups of 2 (32 groups would be InstanceNorm); 16 channels: 8 groups
    assert model.layer2.bn1.num_groups == 16 and model.layer1.bn1.num_groups == 8


def test_forced_num_groups_must_divide_every_layer() -> None:
    with pytest.raises(distnorm.InputError, match=r"'stem\.1'.*16 channels.*num_groups=3"):
        distnorm.convert_model(TinyResNet(), norm="gn_ws", num_groups=3)


def test_unknown_norm_and_reconversion_to_another_norm_are_refused() -> None:
    with pytest.raises(distnorm.ConversionError, match="unknown normalization"):
        distnorm.convert_model(TinyResNet(), norm="layer_norm")
    model = model_for("bgn")
    assert distnorm.convert_model(model, norm="bgn") is model  # same norm again: no-op
    with pytest.raises(distnorm.ConversionError, match=r"'stem\.1'.*already converted.*revert"):
        distnorm.convert_model(model, norm="frozen_bn")


def test_batchnorm_subclass_with_behaviour_is_refused_for_other_norms() -> None:
    class BatchNormReLU(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 8, 1), BatchNormReLU(8))
    with pytest.raises(distnorm.ConversionError, match=r"module '1'.*only 'sync_bn' keeps it"):
        distnorm.convert_model(model, norm="gn_ws")


def gn_ws_block_formula(
    x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int
) -> torch.Tensor:
    """Qiao et al. Sec. 3 (W-hat, biased variance, eps 1e-6 inside the root) then Wu & He
    Eq. (1)-(3) per sample over C/G channels (eps 1e-5), per-channel affine; float64."""
    flat = weight.flatten(1)
    mean = flat.mean(dim=1, keepdim=True)
    var = ((flat - mean) ** 2).mean(dim=1, keepdim=True)
    w_hat = ((flat - mean) / torch.sqrt(var + 1e-6)).view_as(weight)
    y = F.conv2d(x, w_hat, padding=1)
    n, c, h, w = y.shape
    grouped = y.reshape(n, groups, -1)
    g_mean = grouped.mean(dim=2, keepdim=True)
    g_var = ((grouped - g_mean) ** 2).mean(dim=2, keepdim=True)
    normalized = ((grouped - g_mean) / torch.sqrt(g_var + 1e-5)).view(n, c, h, w)
    return normalized * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_converted_gn_ws_block_is_the_papers_formula_and_passes_gradcheck(mode: str) -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)).double()
    with torch.no_grad():
        block[1].weight.uniform_(0.5, 1.5)
        block[1].bias.uniform_(-0.5, 0.5)
    block = distnorm.convert_model(block, norm="gn_ws", num_groups=4).train(mode == "train")
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    conv, norm = block[0], block[1]
    expected = gn_ws_block_formula(x, conv.weight, norm.weight, norm.bias, 4)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-10)

    def run(x: torch.Tensor, conv_w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor):
        parameters = {"0.weight": conv_w, "1.weight": gamma, "1.bias": beta}
        return torch.func.functional_call(block, parameters, (x,))

    assert torch.autograd.gradcheck(run, (x, conv.weight, norm.weight, norm.bias))
