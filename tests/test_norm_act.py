"""Norm-act layers (timm's ``BatchNormAct2d`` family) and tools that find BatchNorms by type,
without timm: a class written from timm's documented behaviour (it computes the BatchNorm
itself with ``F.batch_norm``, then ``drop``, then ``act``) converts under every norm and the
policy, keeps its dropout and activation, reverts to itself; the input ranks of the
replaced class are kept; a PreciseBN-style loop finds converted layers by type. The same
checks with real timm models are in test_timm.py.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distnorm
from distnorm.layers import NormAct

NORMS = ("sync_bn", "gn_ws", "frozen_bn", "bcn", "bgn")


class Shift(nn.Module):
    """Stands in for dropout: a deterministic map, so that order and presence show."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - 0.5


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` as documented: ``act(drop(BatchNorm(x)))``, the BatchNorm
    computed here (not by ``super().forward``), 4-D inputs only."""

    def __init__(self, num_features: int, act: bool = True) -> None:
        super().__init__(num_features)
        self.drop = Shift()
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4, f"expected 4D input (got {x.ndim}D input)"
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            self.training, factor, self.eps,
        )  # fmt: skip
        return self.act(self.drop(x))


class TimmNamed(BatchNormAct2d):
    """The same class under timm's module and name: registered by name, no import needed."""


TimmNamed.__module__ = "timm.layers.norm_act"
TimmNamed.__qualname__ = TimmNamed.__name__ = "BatchNormAct2d"

distnorm.register_norm_act(BatchNormAct2d, post=("drop", "act"))


def net(norm_act: type[nn.Module] = BatchNormAct2d) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), norm_act(8),
        nn.Conv2d(8, 8, 3, padding=1), norm_act(8, act=False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip


def unfused(model: nn.Module) -> nn.Module:
    """The same network with plain BatchNorm2d, then the norm-act's drop and act, as
    separate modules: what every converted norm-act layer must compute."""
    layers = []
    for module in model:
        if isinstance(module, BatchNormAct2d):
            plain = nn.BatchNorm2d(module.num_features)
            plain.load_state_dict(module.state_dict())
            layers += [plain, module.drop, module.act]
        else:
            layers.append(module)
    return nn.Sequential(*layers)


def trained(model: nn.Module) -> nn.Module:
    """Running statistics off their initial values, so that eval outputs say something."""
    with torch.no_grad():
        model.train()(torch.randn(6, 3, 6, 6) * 2 + 1)
    return model.eval()


def images() -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_keeps_dropout_and_activation_after_the_normalization(norm: str) -> None:
    model = trained(net())
    reference = unfused(copy.deepcopy(model))
    converted = distnorm.convert_model(model, norm=norm, num_groups=2)
    expected = distnorm.convert_model(reference, norm=norm, num_groups=2)
    for layer in (converted[1], converted[3]):
        assert isinstance(layer, NormAct) and layer.post_modules == ("drop", "act")
    if norm in ("sync_bn", "frozen_bn", "bgn"):  # BatchNorm-shaped: the same keys
        assert list(converted.state_dict()) == list(net().state_dict())
    x = images()
    for training in (True, False):
        torch.testing.assert_close(converted.train(training)(x), expected.train(training)(x))
    assert (converted[:2].eval()(x) >= 0).all()  # the activation is there


@pytest.mark.parametrize("norm", ["sync_bn", "frozen_bn"])
def test_eval_outputs_are_unchanged_by_conversion_and_by_revert(norm: str) -> None:
    model = trained(net())
    x = images()
    expected = model(x)
    converted = distnorm.convert_model(model, norm=norm).eval()
    assert isinstance(converted[1], BatchNormAct2d)  # timm's freeze helper finds it
    assert torch.equal(converted(x), expected)
    reverted = distnorm.revert_model(converted)
    assert type(reverted[1]) is BatchNormAct2d and type(reverted[3]) is BatchNormAct2d
    assert torch.equal(reverted.eval()(x), expected)


@pytest.mark.parametrize("norm", NORMS)
def test_revert_gives_torch_modules_with_the_same_eval_outputs(norm: str) -> None:
    converted = trained(distnorm.convert_model(net(), norm=norm, num_groups=2))
    x = images()
    expected = converted.eval()(x)
    reverted = distnorm.revert_model(converted).eval()
    assert not any(isinstance(m, (NormAct, distnorm.SyncBatchNorm)) for m in reverted.modules())
    torch.testing.assert_close(reverted(x), expected, rtol=1e-5, atol=1e-6)


def test_registered_by_timms_name_without_importing_timm() -> None:
    converted = distnorm.convert_model(net(TimmNamed), norm="gn_ws", num_groups=2)
    assert type(converted[1]).__name__ == "GroupNormAct"


@pytest.mark.parametrize("batch", [2, 64])
def test_plan_and_convert_agree(batch: int) -> None:
    plan = distnorm.plan(net(), per_worker_batch_size=batch)
    converted = distnorm.convert_model(net(), plan=plan)
    report = {row.name: row.converted for row in distnorm.conversion_report(converted).rows}
    layer_names = {"bgn": "BatchGroupNormAct", "bn": "BatchNormAct2d"}
    for decision in plan.layers:
        assert report[decision.name] == layer_names[decision.norm]


class OwnForward(BatchNormAct2d):
    """Not registered: distnorm cannot tell what its forward does besides BatchNorm."""


def test_an_unregistered_subclass_is_planned_as_sync_bn_and_refused_elsewhere() -> None:
    plan = distnorm.plan(net(OwnForward), per_worker_batch_size=2)
    assert {layer.norm for layer in plan.layers} == {"bn"}  # world of 1: local SyncBN is BN
    assert all("own forward" in layer.reason for layer in plan.layers)
    with pytest.raises(distnorm.ConversionError, match="register_norm_act"):
        distnorm.convert_model(net(OwnForward), norm="bgn")
    with pytest.raises(distnorm.PolicyError, match="register_norm_act"):
        distnorm.plan(
            net(OwnForward), per_worker_batch_size=2,
            policy={"overrides": {"by_type": {"OwnForward": "gn_ws"}}},
        )  # fmt: skip


def test_register_norm_act_refuses_what_it_cannot_use() -> None:
    with pytest.raises(TypeError, match="nn.Module class"):
        distnorm.register_norm_act(BatchNormAct2d(4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="post must name"):
        distnorm.register_norm_act(OwnForward, post=["act()"])


@pytest.mark.parametrize("norm", NORMS)
def test_converted_norm_act_layers_copy_and_pickle(norm: str) -> None:
    model = trained(distnorm.convert_model(net(), norm=norm, num_groups=2))
    x = images()
    expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
                   torch.load(buffer, weights_only=False)):  # fmt: skip
        assert type(copied[1]) is type(model[1])
        assert torch.equal(copied.eval()(x), expected)


# Input ranks: what the replaced class accepted, nothing else (train and eval, every norm).
RANKS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("original", list(RANKS), ids=lambda c: c.__name__)
def test_a_converted_layer_accepts_exactly_its_originals_input_ranks(
    original: type[nn.Module], norm: str, training: bool
) -> None:
    model = distnorm.convert_model(nn.Sequential(nn.Identity(), original(4)), norm=norm)
    layer = model[1].train(training)
    for rank in range(1, 7):
        x = torch.randn(3, 4, *([3] * (rank - 2))) if rank >= 2 else torch.randn(4)
        if rank in RANKS[original]:
            assert layer(x).shape == x.shape
        else:
            with pytest.raises(distnorm.InputError, match=f"got {rank}-D") as error:
                layer(x)
            assert f"{type(layer).__name__} '1'" in str(error.value)


def test_type_keyed_tools_find_converted_batchnorms() -> None:
    """SyncBN and FrozenBN are instances of the BatchNorm class they replaced; grouped
    normalizations (other statistics shapes) are not."""
    for norm, found in (("sync_bn", True), ("frozen_bn", True), ("bgn", False), ("bcn", False)):
        model = distnorm.convert_model(
            nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.BatchNorm3d(4)), norm=norm
        )
        kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        assert [isinstance(m, k) for m, k in zip(model, kinds, strict=True)] == [found] * 3
        assert not isinstance(model[1], (nn.BatchNorm1d, nn.BatchNorm3d))


def precise_bn(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """A PreciseBN loop (fvcore's ``update_bn_stats``, Wu & Johnson 2021): find the
    BatchNorms by type, average each one's batch statistics over ``batches``."""
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.training]
    means = [torch.zeros_like(m.running_mean) for m in layers]
    for m in layers:
        m.momentum = 1.0
    for index, batch in enumerate(batches):
        model(batch)
        for m, mean in zip(layers, means, strict=True):
            mean += (m.running_mean - mean) / (index + 1)
    return means


def test_a_precise_bn_loop_finds_and_updates_converted_layers() -> None:
    seeds = [torch.Generator().manual_seed(seed) for seed in range(3)]
    batches = [torch.randn(4, 3, 6, 6, generator=seed) for seed in seeds]
    plain = unfused(net()).train()
    expected = precise_bn(plain, batches)
    converted = distnorm.convert_model(unfused(net()), norm="sync_bn").train()
    found = precise_bn(converted, batches)
    assert len(found) == len(expected) == 2
    for got, want in zip(found, expected, strict=True):
        torch.testing.assert_close(got, want)
