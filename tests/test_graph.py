"""conv_norm_links: which convolutions feed a normalization layer (torch.fx, or module order)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from distnorm.graph import ConvNormLinks, conv_norm_links
from distnorm.layers.std_conv import WSConv2d
from distnorm.layers.sync_batchnorm import SyncBatchNorm
from tests.models import BasicBlock

BATCHNORMS = (_BatchNorm,)


def test_plain_sequential() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
    )
    links = conv_norm_links(model, BATCHNORMS)
    assert links == ConvNormLinks((("0", "1"), ("3", "4")), "torch.fx", "")
    assert links.convs == ("0", "3")


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.conv(x))


def test_residual_block() -> None:
    links = conv_norm_links(Residual(), BATCHNORMS)
    assert links.pairs == (("conv", "bn"),) and links.method == "torch.fx"


class ConvReluBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.bn(self.relu(self.conv(x))))


def test_conv_then_relu_then_bn_is_not_linked() -> None:
    """Registration order (conv, bn, relu) would pair conv with bn: the data flow wins."""
    links = conv_norm_links(ConvReluBn(), BATCHNORMS)
    assert links.pairs == () and links.method == "torch.fx"


class ConvToNormAndElsewhere(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y.sigmoid()


def test_conv_feeding_a_norm_and_something_else_is_linked() -> None:
    assert conv_norm_links(ConvToNormAndElsewhere(), BATCHNORMS).convs == ("conv",)


class ConvLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 1)
        self.norm = nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).transpose(1, 2)).transpose(1, 2)


class ConvGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 1)
        self.norm = nn.GroupNorm(2, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def test_only_the_asked_norm_types_count() -> None:
    assert conv_norm_links(ConvGroupNorm(), BATCHNORMS).pairs == ()
    assert conv_norm_links(ConvGroupNorm(), (nn.GroupNorm,)).pairs == (("conv", "norm"),)
    # A conv feeding a LayerNorm through a transpose is not a direct input either way.
    assert conv_norm_links(ConvLayerNorm(), BATCHNORMS).pairs == ()
    assert conv_norm_links(ConvLayerNorm(), (nn.LayerNorm,)).pairs == ()


class ConvIntoLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 1)
        self.norm = nn.LayerNorm([6, 5, 5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def test_conv_feeding_a_layernorm_is_not_linked_when_only_batchnorm_is_asked() -> None:
    assert conv_norm_links(ConvIntoLayerNorm(), BATCHNORMS).pairs == ()
    assert conv_norm_links(ConvIntoLayerNorm(), (nn.LayerNorm,)).pairs == (("conv", "norm"),)


class SharedConv(nn.Module):
    """One conv used twice, and registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.alias = self.conv
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.alias(self.bn(self.conv(x))))


def test_shared_conv_called_twice_counts_once() -> None:
    links = conv_norm_links(SharedConv(), BATCHNORMS)
    assert links.pairs == (("conv", "bn"),) and links.convs == ("conv",)


class KeywordInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(input=self.conv(x))


def test_norm_called_with_a_keyword_argument() -> None:
    assert conv_norm_links(KeywordInput(), BATCHNORMS).convs == ("conv",)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3)
        self.bn2 = nn.BatchNorm2d(8)  # registered after conv2 but of another width
        self.conv3 = nn.Conv2d(8, 8, 3)
        self.act = nn.ReLU()
        self.bn3 = nn.BatchNorm2d(8)  # after an activation: not linked
        self.head = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Sequential(nn.BatchNorm2d(8)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        if x.sum() > 0:
            x = self.bn3(self.act(self.conv3(x)))
        return self.head(x) + self.conv2(x).mean()


def test_untraceable_model_falls_back_to_module_order_and_says_why() -> None:
    links = conv_norm_links(DataDependent(), BATCHNORMS)
    assert links.method == "module order"
    assert "torch.fx could not trace DataDependent.forward" in links.reason
    assert "TraceError" in links.reason and "control flow" in links.reason
    assert links.pairs == (("conv1", "bn1"), ("head.0", "head.1.0"))


class BatchNormAct(nn.BatchNorm2d):
    """timm-style: a BatchNorm subclass with a submodule, and Python control flow on a
    tensor in forward, which must not be traced into."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max() > 0:
            x = super().forward(x)
        return self.act(x)


def test_norm_subclasses_and_ws_convs_are_single_nodes() -> None:
    model = nn.Sequential(
        WSConv2d(3, 8, 3), SyncBatchNorm(8), nn.Conv2d(8, 8, 3), BatchNormAct(8), nn.Conv2d(8, 2, 1)
    )
    links = conv_norm_links(model, BATCHNORMS)
    assert links.method == "torch.fx", links.reason
    assert links.pairs == (("0", "1"), ("2", "3"))


class Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck (expansion 4), identity shortcut."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        width = planes * 4
        self.conv1 = nn.Conv2d(width, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + x)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.layer2 = nn.Sequential(Bottleneck(4))
        self.head = nn.Conv2d(16, 10, 1)  # no norm after it: must not be linked
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return torch.flatten(self.avgpool(self.head(x)), 1)


def test_resnet_blocks_with_downsample() -> None:
    model = TinyResNet()
    links = conv_norm_links(model, BATCHNORMS)
    assert links.method == "torch.fx"
    expected = {
        ("conv1", "bn1"),
        ("layer1.0.conv1", "layer1.0.bn1"),
        ("layer1.0.conv2", "layer1.0.bn2"),
        ("layer1.1.conv1", "layer1.1.bn1"),
        ("layer1.1.conv2", "layer1.1.bn2"),
        ("layer1.1.downsample.0", "layer1.1.downsample.1"),
        ("layer2.0.conv1", "layer2.0.bn1"),
        ("layer2.0.conv2", "layer2.0.bn2"),
        ("layer2.0.conv3", "layer2.0.bn3"),
    }
    assert set(links.pairs) == expected and len(links.pairs) == len(expected)
    convs = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs - set(links.convs) == {"head"}
    model(torch.randn(1, 3, 32, 32))  # the model is a real one, and tracing left it usable


def test_functional_norms_are_not_seen() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.batch_norm(self.conv(x), None, None, training=True)

    assert conv_norm_links(Functional(), BATCHNORMS).pairs == ()
