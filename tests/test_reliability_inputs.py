"""Bad input, in one process: each mistake gets a distnorm error that names the layer and
says what to do, for every layer kind; a model without BatchNorm converts with a warning;
converting a converted model changes nothing, whatever the norm; layouts that do not fit
the world are refused before anything is created.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import distnorm
from distnorm import comm
from distnorm.layers import SyncBatchNorm

CHANNELS = 4

# Each layer kind, built by convert_model so that errors can name it ('1').
LAYERS = {
    "sync_bn": ("sync_bn", {}),
    "bgn": ("bgn", {}),
    "bcn": ("bcn", {}),
    "bcn_batch": ("bcn", {"estimated": False}),
    "frozen_bn": ("frozen_bn", {}),
}


def named(kind: str, original: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    norm, attributes = LAYERS[kind]
    model = nn.Sequential(nn.Identity(), original(CHANNELS))
    layer = distnorm.convert_model(model, norm=norm, num_groups=2)[1]
    for attribute, value in attributes.items():
        setattr(layer, attribute, value)
    return layer


BAD_INPUTS = {
    "1-d": (torch.randn(CHANNELS), r"\(N, (C|4), \*\)|expects 4-D input, got 1-D"),
    "wrong-channels": (
        torch.randn(2, CHANNELS + 1, 3, 3),
        "4 channels but its input has 5|got shape",
    ),
    "integer": (torch.ones(2, CHANNELS, 3, 3, dtype=torch.int64), "floating-point"),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("bad", list(BAD_INPUTS))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_bad_input_is_refused_naming_the_layer(kind: str, bad: str, training: bool) -> None:
    layer = named(kind).train(training)
    bad_input, complaint = BAD_INPUTS[bad]
    with pytest.raises(distnorm.InputError, match=complaint) as error:
        layer(bad_input)
    assert f"{type(layer).__name__} '1'" in str(error.value)


@pytest.mark.parametrize("group", [None, comm.LOCAL], ids=["world-of-one", "local-group"])
def test_a_batch_of_one_with_no_peers_says_which_policy_choice_fixes_it(group) -> None:
    layer = named("sync_bn", nn.BatchNorm1d)
    layer.process_group = group
    with pytest.raises(distnorm.InputError) as error:
        layer(torch.randn(1, CHANNELS))
    message = str(error.value)
    assert message.startswith("SyncBatchNorm1d '1' got 1 value per channel")
    for choice in ("'sync_bn'", "'gn_ws'", "'frozen_bn'"):
        assert choice in message
    # What the message suggests works: GroupNorm needs no batch statistics.
    model = distnorm.convert_model(nn.Sequential(nn.BatchNorm1d(CHANNELS)), norm="gn_ws")
    assert model(torch.randn(1, CHANNELS)).shape == (1, CHANNELS)


def test_a_batch_of_one_with_spatial_values_still_trains() -> None:
    """One sample of 2x2 positions is 4 values per channel: BatchNorm is defined."""
    layer = SyncBatchNorm(CHANNELS)
    assert torch.isfinite(layer(torch.randn(1, CHANNELS, 2, 2))).all()


def test_model_without_batchnorm_converts_with_a_warning_not_an_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU())
    with pytest.warns(UserWarning, match="Sequential has no BatchNorm layers, so nothing was"):
        assert distnorm.convert_model(model) is model
    with pytest.warns(UserWarning, match="no BatchNorm layers"):
        distnorm.convert_model(model, norm="gn_ws")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.bn_head = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_head(self.head(self.bn(self.conv(x)).mean(dim=(2, 3))))


@pytest.mark.parametrize("norm", ["sync_bn", "bgn", "bcn", "frozen_bn", "gn_ws"])
def test_converting_a_converted_model_changes_nothing(norm: str) -> None:
    torch.manual_seed(0)
    model = distnorm.convert_model(Net(), norm=norm, num_groups=2, check_sync=False)
    model.train()(torch.randn(4, 3, 5, 5))
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = str(distnorm.conversion_report(model))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning
        again = distnorm.convert_model(model, norm=norm, num_groups=2)
    assert again is model
    assert dict(again.named_modules()) == modules
    assert str(distnorm.conversion_report(again)) == report
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())
    synchronized = [m for m in again.modules() if isinstance(m, SyncBatchNorm)]
    assert all(m.check_sync is False for m in synchronized)  # the first conversion's choice


def test_converting_a_converted_model_to_another_norm_is_refused() -> None:
    model = distnorm.convert_model(Net(), norm="bgn", num_groups=2)
    with pytest.raises(distnorm.ConversionError, match="already converted to 'bgn'.*revert_model"):
        distnorm.convert_model(model, norm="sync_bn")


def test_check_sync_reaches_every_synchronized_layer() -> None:
    for check_sync in (True, False):
        model = distnorm.convert_model(Net(), check_sync=check_sync)
        layers = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
        assert len(layers) == 2 and all(m.check_sync is check_sync for m in layers)
    reverted = distnorm.revert_model(model)
    assert not any(hasattr(m, "check_sync") or hasattr(m, "nonfinite") for m in reverted.modules())


@pytest.mark.parametrize(
    "make_layout, complaint",
    [
        (lambda: comm.sync_group(3), "cannot make sync groups of 3 ranks in a world of 1"),
        (lambda: comm.world_layout(world_size=0), "world size must be at least 1"),
        (lambda: comm.world_layout(world_size=4, ranks_per_node=0), "ranks per node"),
    ],
    ids=["group-larger-than-world", "empty-world", "empty-node"],
)
def test_layouts_that_do_not_fit_are_refused(make_layout, complaint: str) -> None:
    with pytest.raises(distnorm.DistNormError, match=complaint):
        make_layout()


def test_a_plan_for_another_world_size_is_refused() -> None:
    plan = distnorm.plan(Net(), per_worker_batch_size=8, world_size=4)
    with pytest.raises(distnorm.ConversionError, match="made for a world of 4 ranks but this job"):
        distnorm.convert_model(Net(), plan=plan)


def test_a_sync_group_larger_than_the_world_in_a_policy_is_refused() -> None:
    policy = {"overrides": {"by_name": {"bn": {"norm": "sync_bn", "sync_group_size": 8}}}}
    with pytest.raises(distnorm.PolicyError, match="8"):
        distnorm.plan(Net(), per_worker_batch_size=8, world_size=4, policy=policy)
