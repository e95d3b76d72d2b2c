"""``distnorm.norm_layer``: a norm factory for model builders' ``norm_layer=`` arguments.

The builders here follow torchvision's ResNet (``norm_layer(planes)``, default
``nn.BatchNorm2d``) and detectron2's ``get_norm(norm, out_channels)`` (a string, or a
callable called with the channel count); real timm and torchvision are in test_timm.py. A
model built with the factory (then ``standardize_weights``) is the model that
``convert_model`` makes of the same builder's BatchNorm model: same layers, same outputs,
and on 2 real ranks the same synchronized statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import distnorm
from distnorm import comm
from tests.multiprocess import run_on_ranks


class Block(nn.Module):
    """torchvision's BasicBlock, its norms from ``norm_layer``."""

    def __init__(self, inplanes: int, planes: int, norm_layer: Callable[..., nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, bias=False),
                                        norm_layer(planes))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.downsample(x))


def resnet(norm_layer: Callable[..., nn.Module] | None = None) -> nn.Module:
    """A torchvision-style builder: ``norm_layer`` defaults to ``nn.BatchNorm2d``."""
    norm_layer = norm_layer or nn.BatchNorm2d
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), norm_layer(16), nn.ReLU(),
        Block(16, 32, norm_layer), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5),
    )  # fmt: skip


def get_norm(norm: str | Callable[[int], nn.Module] | None, out_channels: int) -> nn.Module:
    """detectron2's ``get_norm`` as documented: a name from its table, or a callable."""
    if norm is None:
        return nn.Identity()
    if isinstance(norm, str):
        norm = {"BN": nn.BatchNorm2d, "GN": lambda c: nn.GroupNorm(32, c)}[norm]
    return norm(out_channels)


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def kinds(model: nn.Module) -> list[tuple[str, str]]:
    return [(n, type(m).__name__) for n, m in model.named_modules() if n]


@pytest.mark.parametrize(
    "options",
    [{"per_worker_batch_size": 2}, {"per_worker_batch_size": 64}, {"norm": "gn_ws"},
     {"norm": "frozen_bn"}, {"norm": "bcn", "num_groups": 4}, {}],
    ids=["policy-bgn", "policy-bn", "gn_ws", "frozen_bn", "bcn", "default-sync_bn"],
)  # fmt: skip
def test_a_model_built_with_the_factory_is_the_converted_model(options: dict[str, Any]) -> None:
    expected = distnorm.convert_model(resnet(), **options)
    built = distnorm.standardize_weights(resnet(distnorm.norm_layer(**options)))
    assert kinds(built) == kinds(expected)
    for training in (True, False):
        x = images()
        torch.testing.assert_close(built.train(training)(x), expected.train(training)(x))


def test_detectron2_style_get_norm_takes_the_factory() -> None:
    factory = distnorm.norm_layer(norm="sync_bn")
    layer = get_norm(factory, 64)
    assert isinstance(layer, distnorm.SyncBatchNorm2d) and layer.num_features == 64


def test_bad_arguments_say_what_to_do() -> None:
    with pytest.raises(TypeError, match="act_layer.*convert_model"):
        distnorm.norm_layer(norm="bgn")(32, act_layer=nn.ReLU)
    with pytest.raises(distnorm.ConversionError, match="dims must be 1, 2 or 3"):
        distnorm.norm_layer(dims=4)
    with pytest.raises(distnorm.ConversionError, match="force the norm"):
        distnorm.norm_layer(2, norm="gn_ws")
    with pytest.raises(distnorm.ConversionError, match="without per_worker_batch_size"):
        distnorm.norm_layer(pretrained=True)


def test_layers_built_before_the_process_group_join_at_their_first_training_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")  # what torchrun exports before init_process_group
    monkeypatch.setenv("RANK", "3")
    layer = distnorm.norm_layer(per_worker_batch_size=16)(8)
    assert isinstance(layer, distnorm.SyncBatchNorm2d)
    assert layer.process_group == comm.PortableGroup((2, 3), pid=-1, key=0)


def factory_worker(rank: int, world_size: int) -> dict[str, list[torch.Tensor]]:
    stats = {}
    for how in ("factory", "convert"):
        if how == "factory":
            model = resnet(distnorm.norm_layer(per_worker_batch_size=8))
        else:
            model = distnorm.convert_model(resnet(), per_worker_batch_size=8)
        model.train()(images(seed=rank)).sum().backward()
        stats[how] = [b.clone() for n, b in model.named_buffers() if "running" in n]
    return stats


def test_on_two_ranks_the_factory_synchronizes_as_convert_model_does() -> None:
    results = run_on_ranks(factory_worker, 2)
    for result in results:
        assert len(result["factory"]) == 8
        for built, converted in zip(result["factory"], result["convert"], strict=True):
            assert torch.equal(built, converted)
    for mine, theirs in zip(results[0]["factory"], results[1]["factory"], strict=True):
        assert torch.equal(mine, theirs)  # one SyncBatchNorm over both ranks
