"""convert_model / revert_model / conversion_report, in one process.

Without a process group SyncBatchNorm computes plain BatchNorm, so a converted model must
behave exactly as before: same state_dict, same outputs bit for bit, same parameters.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distnorm


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, momentum=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallNet(nn.Module):
    """2d and 1d BatchNorms, a residual block, a LayerNorm and a GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(8)
        self.gn = nn.GroupNorm(2, 8)
        self.head = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.LayerNorm(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gn(self.block(self.stem(x))).mean(dim=(2, 3)))


class BatchNormReLU(nn.BatchNorm2d):
    """A BatchNorm subclass with behaviour of its own, timm's BatchNormAct2d style."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class BypassingBatchNormReLU(nn.BatchNorm2d):
    """A subclass that computes the norm itself: distnorm cannot synchronize it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
            self.momentum, self.eps,
        )  # fmt: skip
        return F.relu(y)


def trained(model: nn.Module, steps: int = 3) -> nn.Module:
    """A few SGD steps so that running statistics and parameters are not at their init."""
    torch.manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 6, 6)).square().mean().backward()
        optimizer.step()
    return model


def fresh_net() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet()


def batchnorm_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


EXPECTED_BATCHNORMS = ["stem.1", "block.bn1", "block.bn2", "head.1"]


def test_every_batchnorm_becomes_sync_batchnorm_and_is_reported() -> None:
    model = distnorm.convert_model(fresh_net())
    assert batchnorm_names(model) == EXPECTED_BATCHNORMS
    assert all(
        type(m) in (distnorm.SyncBatchNorm1d, distnorm.SyncBatchNorm2d)
        for n, m in model.named_modules()
        if n in EXPECTED_BATCHNORMS
    )
    report = distnorm.conversion_report(model)
    assert [(r.name, r.original) for r in report.converted] == [
        ("stem.1", "BatchNorm2d"),
        ("block.bn1", "BatchNorm2d"),
        ("block.bn2", "BatchNorm2d"),
        ("head.1", "BatchNorm1d"),
    ]
    text = str(report)
    assert text.splitlines()[0].split() == ["layer", "was", "now", "sync", "group"]
    assert "block.bn2" in text and "BatchNorm1d" in text


def test_other_norms_are_left_alone_and_listed() -> None:
    model = distnorm.convert_model(fresh_net())
    assert type(model.gn) is nn.GroupNorm and type(model.head[2]) is nn.LayerNorm
    left_alone = {
        r.name: r for r in distnorm.conversion_report(model).rows if "left alone" in r.sync_group
    }
    assert set(left_alone) == {"gn", "head.2"}


def test_model_without_norms_is_unchanged_and_reported_empty() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.warns(UserWarning, match="no BatchNorm layers"):
        assert distnorm.convert_model(model) is model
    assert str(distnorm.conversion_report(model)) == "no normalization layers"


def test_parameters_buffers_flags_and_keys_are_carried_over() -> None:
    original = trained(fresh_net())
    original.block.bn1.eval()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    parameters_before = list(original.parameters())
    converted = distnorm.convert_model(original)
    after = converted.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # Same tensor objects: an optimizer built before conversion still updates the model.
    assert all(a is b for a, b in zip(converted.parameters(), parameters_before, strict=True))
    assert converted.block.bn1.training is False and converted.block.bn2.training is True
    assert converted.block.bn2.momentum is None


def test_optimizer_built_before_conversion_still_trains_the_model() -> None:
    model = fresh_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model = distnorm.convert_model(model)
    weight_before = model.block.bn1.weight.detach().clone()
    model(torch.randn(4, 3, 6, 6)).square().mean().backward()
    optimizer.step()
    assert not torch.equal(model.block.bn1.weight, weight_before)


def test_converted_model_computes_exactly_what_it_did() -> None:
    reference = trained(fresh_net())
    converted = distnorm.convert_model(copy.deepcopy(reference))
    x = torch.randn(5, 3, 6, 6)
    for mode in ("train", "eval"):
        reference.train(mode == "train")
        converted.train(mode == "train")
        assert torch.equal(converted(x), reference(x)), mode
    assert torch.equal(converted.block.bn1.running_var, reference.block.bn1.running_var)


def test_checkpoints_load_both_ways() -> None:
    converted = trained(distnorm.convert_model(fresh_net()))
    plain = fresh_net()
    plain.load_state_dict(converted.state_dict(), strict=True)
    x = torch.randn(3, 3, 6, 6)
    assert torch.equal(plain.eval()(x), converted.eval()(x))

    other_plain = trained(fresh_net(), steps=5)
    other_converted = distnorm.convert_model(fresh_net())
    other_converted.load_state_dict(other_plain.state_dict(), strict=True)
    assert torch.equal(other_converted.eval()(x), other_plain.eval()(x))


def test_revert_gives_original_classes_and_identical_eval_outputs() -> None:
    converted = trained(distnorm.convert_model(fresh_net()))
    x = torch.randn(3, 3, 6, 6)
    expected = converted.eval()(x)
    reverted = distnorm.revert_model(converted)
    kinds = {n: type(m) for n, m in reverted.named_modules() if n in EXPECTED_BATCHNORMS}
    assert kinds == {
        "stem.1": nn.BatchNorm2d,
        "block.bn1": nn.BatchNorm2d,
        "block.bn2": nn.BatchNorm2d,
        "head.1": nn.BatchNorm1d,
    }
    assert torch.equal(reverted(x), expected)
    for name in EXPECTED_BATCHNORMS:
        layer = reverted.get_submodule(name)
        for attribute in ("_shift", "_distnorm_origin", "_distnorm_name", "process_group"):
            assert not hasattr(layer, attribute), (name, attribute)


def test_root_batchnorm_is_replaced_and_reverted() -> None:
    root = nn.BatchNorm3d(4)
    converted = distnorm.convert_model(root)
    assert type(converted) is distnorm.SyncBatchNorm3d
    assert [r.name for r in distnorm.conversion_report(converted).rows] == ["(root)"]
    assert type(distnorm.revert_model(converted)) is nn.BatchNorm3d


def test_converting_twice_changes_nothing() -> None:
    model = distnorm.convert_model(fresh_net())
    modules = dict(model.named_modules())
    again = distnorm.convert_model(model)
    assert again is model
    assert all(m is modules[n] for n, m in again.named_modules())


def test_shared_batchnorm_stays_shared() -> None:
    shared = nn.BatchNorm2d(3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    converted = distnorm.convert_model(model)
    assert converted[0] is converted[2]
    assert isinstance(converted[0], distnorm.SyncBatchNorm)


def test_forward_hooks_still_fire() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    calls = []
    model[1].register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
    distnorm.convert_model(model)(torch.randn(2, 3, 5, 5))
    assert calls == [torch.Size([2, 4, 5, 5])]


def test_subclass_with_activation_keeps_it() -> None:
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormReLU(4))
    reference = copy.deepcopy(original)
    converted = distnorm.convert_model(original)
    layer = converted[1]
    assert isinstance(layer, BatchNormReLU) and isinstance(layer, distnorm.SyncBatchNorm)
    assert isinstance(layer.act, nn.ReLU)
    x = torch.randn(4, 3, 6, 6) * 3
    for mode in (True, False):
        y = converted.train(mode)(x)
        assert (y >= 0).all() and (y == 0).any(), "the ReLU after the norm must still apply"
        assert torch.equal(y, reference.train(mode)(x))
    restored = pickle.loads(pickle.dumps(converted))
    assert type(restored[1]) is type(layer) and torch.equal(restored.eval()(x), y)
    assert torch.equal(copy.deepcopy(converted).eval()(x), y)
    assert type(distnorm.revert_model(converted)[1]) is BatchNormReLU


def test_subclass_bypassing_super_forward_raises_naming_the_module() -> None:
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 4, 1)))
    model.features.add_module("norm_act", BypassingBatchNormReLU(4))
    converted = distnorm.convert_model(model)
    with pytest.raises(distnorm.ConversionError, match=r"features\.norm_act.*super\(\)\.forward"):
        converted(torch.randn(2, 3, 4, 4))


def test_lazy_batchnorm_before_its_first_forward_is_refused() -> None:
    with pytest.raises(distnorm.ConversionError, match="forward"):
        distnorm.convert_model(nn.Sequential(nn.LazyBatchNorm2d()))


@pytest.mark.parametrize(
    "bad_input, complaint",
    [
        (torch.randn(4), "expects 4-D input, got 1-D"),
        (torch.randn(2, 5, 3, 3), "has 4 channels but its input has 5"),
        (torch.ones(2, 4, 3, 3, dtype=torch.int64), "floating-point"),
    ],
    ids=["1-d", "wrong-channels", "integer"],
)
def test_bad_input_is_refused_naming_the_layer(bad_input: torch.Tensor, complaint: str) -> None:
    model = distnorm.convert_model(nn.Sequential(nn.Identity(), nn.BatchNorm2d(4)))
    with pytest.raises(distnorm.InputError, match=complaint) as error:
        model(bad_input)
    assert "SyncBatchNorm2d '1'" in str(error.value)
    assert isinstance(error.value, distnorm.DistNormError)
