"""Real timm models (skipped where timm does not import: it needs torchvision, whose CPU
wheels pair with the full torch wheel; see README "Works with"). Models built on timm's
``BatchNormAct2d`` family convert under every norm and the policy, keep their outputs where
the maths says so, revert to timm's classes, train on 2 ranks with identical statistics,
and are found by timm's ``freeze_batch_norm_2d``; a ``distnorm.norm_layer`` factory builds
timm's and torchvision's ResNets.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import distnorm
from tests.multiprocess import run_on_ranks

timm = pytest.importorskip("timm")
from timm.layers import (  # noqa: E402
    BatchNormAct2d,
    FrozenBatchNormAct2d,
    SyncBatchNormAct,
    freeze_batch_norm_2d,
)

MODELS = ["efficientnet_b0", "mobilenetv3_large_100", "regnety_002", "cspresnet50", "resnet18d"]
NORMS = ["sync_bn", "gn_ws", "frozen_bn", "bcn", "bgn", None]  # None: the policy


def create(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5)
    with torch.no_grad():  # running statistics off their defaults
        model.train()(torch.randn(4, 3, 32, 32))
    return model.eval()


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def converted(model: nn.Module, norm: str | None) -> nn.Module:
    if norm is None:
        return distnorm.convert_model(model, per_worker_batch_size=2)
    return distnorm.convert_model(model, norm=norm)


@pytest.mark.parametrize("norm", NORMS, ids=lambda n: n or "policy")
@pytest.mark.parametrize("name", MODELS)
def test_timm_models_convert_train_and_revert(name: str, norm: str | None) -> None:
    model = create(name)
    x = images()
    expected = model(x)
    norm_acts = [n for n, m in model.named_modules() if isinstance(m, BatchNormAct2d)]
    model = converted(model, norm)
    if norm in ("sync_bn", "frozen_bn"):  # the same maths in eval: the same outputs
        assert torch.equal(model.eval()(x), expected)
        assert all(isinstance(model.get_submodule(n), BatchNormAct2d) for n in norm_acts)
    for n in norm_acts:  # dropout and activation still follow the normalization
        layer = model.get_submodule(n)
        assert isinstance(layer, distnorm.layers.NormAct) and layer.post_modules
    model.train()(x).sum().backward()
    out = model.eval()(x)
    reverted = distnorm.revert_model(model).eval()
    assert not any(isinstance(m, distnorm.layers.NormAct) for m in reverted.modules())
    if norm != "bcn" and norm != "gn_ws":
        assert all(type(reverted.get_submodule(n)) is BatchNormAct2d for n in norm_acts)
    torch.testing.assert_close(reverted(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_plan_and_convert_agree_on_timm_models(name: str) -> None:
    plan = distnorm.plan(create(name), per_worker_batch_size=2)
    model = distnorm.convert_model(create(name), plan=plan)
    for decision in plan.layers:
        layer = model.get_submodule(decision.name)
        if decision.norm == "bgn":
            assert isinstance(layer, distnorm.BatchGroupNorm), decision
        elif decision.norm == "keep":
            assert not isinstance(layer, distnorm.SyncBatchNorm), decision


def test_frozen_norm_act_layers_are_kept_and_listed() -> None:
    model = freeze_batch_norm_2d(create("efficientnet_b0"))
    frozen = [n for n, m in model.named_modules() if isinstance(m, FrozenBatchNormAct2d)]
    plan = distnorm.plan(model, per_worker_batch_size=2)
    assert frozen and {d.name for d in plan.layers if "already frozen" in d.reason} >= set(frozen)
    x = images()
    expected = model(x)
    for norm in ("sync_bn", "bgn", "gn_ws"):  # every BatchNorm is frozen: nothing to convert
        with pytest.warns(UserWarning, match="no BatchNorm layers"):
            same = distnorm.convert_model(copy.deepcopy(model), norm=norm)
        assert torch.equal(same.eval()(x), expected)


@pytest.mark.parametrize("norm", ["sync_bn", "bgn", "gn_ws"])
def test_timms_own_sync_batchnorm_act_converts_too(norm: str) -> None:
    model = timm.layers.convert_sync_batchnorm(create("regnety_002"))
    synced = [n for n, m in model.named_modules() if isinstance(m, SyncBatchNormAct)]
    assert synced
    model = distnorm.convert_model(model, norm=norm)
    for n in synced:
        layer = model.get_submodule(n)
        assert isinstance(layer, distnorm.layers.NormAct) and layer.post_modules == ("drop", "act")
    model.train()(images()).sum().backward()


def test_timms_freeze_helper_finds_converted_layers() -> None:
    model = distnorm.convert_model(create("resnet18d"), norm="sync_bn")
    synced = [n for n, m in model.named_modules() if isinstance(m, distnorm.SyncBatchNorm)]
    frozen = freeze_batch_norm_2d(model)
    assert len(synced) == 22
    assert not any(isinstance(m, distnorm.SyncBatchNorm) for m in frozen.modules())
    assert torch.equal(frozen.eval()(images()), model.eval()(images()))


def test_timm_and_torchvision_builders_take_the_norm_factory() -> None:
    factory = distnorm.norm_layer(per_worker_batch_size=2)
    model = distnorm.standardize_weights(timm.create_model("resnet18d", norm_layer=factory))
    assert any(isinstance(m, distnorm.BatchGroupNorm) for m in model.modules())
    model.train()(images()).sum().backward()
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(norm_layer=distnorm.norm_layer(norm="sync_bn"))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    assert all(
        isinstance(m, distnorm.SyncBatchNorm2d)
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    )


def efficientnet_worker(rank: int, world_size: int) -> list[torch.Tensor]:
    model = distnorm.convert_model(create("efficientnet_b0"), norm="sync_bn").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(2, 3, 32, 32, generator=generator) * (1 + rank)
    model(x).square().mean().backward()
    optimizer.step()
    return [b.clone() for n, b in model.named_buffers() if "running" in n]


def test_efficientnet_trains_on_two_ranks_with_identical_statistics() -> None:
    first, second = run_on_ranks(efficientnet_worker, 2, timeout_s=300)
    reference = [b for n, b in create("efficientnet_b0").named_buffers() if "running" in n]
    assert len(first) == len(reference) > 90
    for mine, theirs in zip(first, second, strict=True):
        assert torch.equal(mine, theirs)
    assert not all(torch.equal(a, b) for a, b in zip(first, reference, strict=True))
