"""BatchGroupNorm in one process against Batch Group Normalization (Zhou et al. 2020) written
out in float64 here: statistics over dims (0, 2) of ``x.view(N, G, -1)``, a per-channel
affine, and BatchNorm's running-statistics update, in train and eval mode; gradcheck; the
G = C and G = 1 ends; dtypes, memory formats and bad inputs; BatchNorm's state_dict keys;
and the two bridges to BatchNorm (statistics in from a trained BatchNorm, eval output out
to one holding the expanded statistics).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distnorm.errors import InputError
from distnorm.layers import sync_batchnorm
from distnorm.layers.batch_group_norm import BatchGroupNorm

CHANNELS = 6
EPS = 1e-5
SPATIAL = {"0d": (), "1d": (5,), "2d": (4, 3), "3d": (3, 2, 2)}
STEPS = 3


# --- the paper's formula, float64, independent of the layer -------------------------------


class Reference:
    """BGN as the paper writes it, with BatchNorm's running statistics (one per group)."""

    def __init__(self, groups: int, momentum: float | None = 0.1) -> None:
        self.groups, self.momentum = groups, momentum
        self.running_mean = torch.zeros(groups, dtype=torch.float64)
        self.running_var = torch.ones(groups, dtype=torch.float64)
        self.num_batches_tracked = 0

    def train_step(
        self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor:
        grouped = x.reshape(x.size(0), self.groups, -1)
        mean = grouped.mean(dim=(0, 2))
        var = grouped.var(dim=(0, 2), unbiased=False)
        count = grouped.size(0) * grouped.size(2)
        self.num_batches_tracked += 1
        factor = 1 / self.num_batches_tracked if self.momentum is None else self.momentum
        with torch.no_grad():
            self.running_mean = (1 - factor) * self.running_mean + factor * mean
            unbiased = var * count / (count - 1)
            self.running_var = (1 - factor) * self.running_var + factor * unbiased
        return self._transform(grouped, mean, var, x.shape, weight, bias)

    def eval(
        self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor:
        grouped = x.reshape(x.size(0), self.groups, -1)
        return self._transform(grouped, self.running_mean, self.running_var, x.shape, weight, bias)

    @staticmethod
    def _transform(grouped, mean, var, shape, weight, bias) -> torch.Tensor:
        xhat = ((grouped - mean.view(1, -1, 1)) / torch.sqrt(var.view(1, -1, 1) + EPS)).reshape(
            shape
        )
        channel = [1, -1] + [1] * (len(shape) - 2)
        if weight is not None:
            xhat = xhat * weight.view(channel)
        if bias is not None:
            xhat = xhat + bias.view(channel)
        return xhat


def data(step: int, spatial: tuple[int, ...], batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Channels of different means and scales (so that pooling them matters), and a grad."""
    generator = torch.Generator().manual_seed(100 + step)
    channel = [1, CHANNELS] + [1] * len(spatial)
    scale = torch.tensor([2.0, 0.5, 1.0, 3.0, 1.5, 0.25], dtype=torch.float64).view(channel)
    mean = torch.tensor([3.0, -4.0, 5.0, 1.0, 0.0, -2.0], dtype=torch.float64).view(channel)
    shape = (batch, CHANNELS, *spatial)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + mean * (1 + step)
    return x, torch.randn(shape, generator=generator, dtype=torch.float64)


def affine() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    weight = 1 + 0.3 * torch.randn(CHANNELS, generator=generator, dtype=torch.float64)
    return weight, 0.2 * torch.randn(CHANNELS, generator=generator, dtype=torch.float64)


def layer_with_affine(groups: int, **kwargs) -> BatchGroupNorm:
    layer = BatchGroupNorm(CHANNELS, groups, **kwargs).double()
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.copy_(affine()[0])
            layer.bias.copy_(affine()[1])
    return layer


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12, msg=what)


@pytest.fixture(params=["kernel", "fused"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways one process computes the batch statistics: torch's kernel on the grouped
    view (small contiguous inputs, as all inputs here are), and the fused path that large
    and channels-last inputs take, forced here by a size limit of 0."""
    if request.param == "fused":
        monkeypatch.setattr(sync_batchnorm, "GROUPED_KERNEL_MAX_VALUES", 0)
    return request.param


# --- train and eval against the formula -----------------------------------------------------


@pytest.mark.parametrize("spatial", list(SPATIAL))
@pytest.mark.parametrize("groups", [1, 2, 3, CHANNELS])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_train_then_eval_match_the_formula(
    spatial: str, groups: int, momentum: float | None, path: str
) -> None:
    layer = layer_with_affine(groups, momentum=momentum)
    reference = Reference(groups, momentum)
    weight, bias = affine()
    for step in range(STEPS):
        x, grad = data(step, SPATIAL[spatial])
        x_ref = x.clone().requires_grad_(True)
        w_ref, b_ref = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        expected = reference.train_step(x_ref, w_ref, b_ref)
        expected.backward(grad)

        x.requires_grad_(True)
        layer.zero_grad()
        output = layer(x)
        output.backward(grad)
        where = f"step {step}"
        close(output, expected, f"{where} output")
        close(x.grad, x_ref.grad, f"{where} grad input")
        close(layer.weight.grad, w_ref.grad, f"{where} grad weight")
        close(layer.bias.grad, b_ref.grad, f"{where} grad bias")
        close(layer.running_mean, reference.running_mean, f"{where} running mean")
        close(layer.running_var, reference.running_var, f"{where} running var")
        assert layer.running_mean.shape == (groups,)
        assert int(layer.num_batches_tracked) == reference.num_batches_tracked

    layer.eval()
    x, _ = data(STEPS, SPATIAL[spatial])
    close(layer(x), reference.eval(x, weight, bias), "eval output")


def test_without_affine_or_running_stats(path: str) -> None:
    """affine=False: the bare normalization; no running statistics: batch statistics in eval
    too (as nn.BatchNorm does)."""
    layer = BatchGroupNorm(CHANNELS, 2, affine=False, track_running_stats=False).double()
    assert layer.running_mean is None and layer.channel_running_stats() is None
    x, _ = data(0, SPATIAL["2d"])
    expected = Reference(2).train_step(x, None, None)
    close(layer(x), expected, "train")
    close(layer.eval()(x), expected, "eval with batch statistics")


def test_weight_without_bias(path: str) -> None:
    """torch's ``bias=False``: a per-channel scale and no shift."""
    layer = BatchGroupNorm(CHANNELS, 3, bias=False).double()
    assert layer.bias is None
    with torch.no_grad():
        layer.weight.copy_(affine()[0])
    x, _ = data(0, SPATIAL["1d"])
    close(layer(x), Reference(3).train_step(x, affine()[0], None), "bias=False")


def test_group_of_all_channels_equals_batchnorm_bit_for_bit() -> None:
    """G = C is BatchNorm: same outputs, gradients and statistics as nn.BatchNorm2d."""
    torch_layer, ours = nn.BatchNorm2d(CHANNELS), BatchGroupNorm(CHANNELS, CHANNELS)
    for layer in (torch_layer, ours):
        with torch.no_grad():
            layer.weight.copy_(affine()[0])
            layer.bias.copy_(affine()[1])
    results = []
    for layer in (torch_layer, ours):
        outputs = []
        for step in range(STEPS):
            x, grad = (t.float() for t in data(step, SPATIAL["2d"]))
            x.requires_grad_(True)
            layer.zero_grad()
            y = layer(x)
            y.backward(grad)
            outputs += [y, x.grad, layer.weight.grad, layer.bias.grad]
        outputs += [layer.running_mean, layer.running_var, layer.eval()(x.detach())]
        results.append(outputs)
    for expected, actual in zip(*results, strict=True):
        assert torch.equal(expected, actual)


def test_one_group_normalizes_over_everything() -> None:
    """G = 1: one mean and variance for the whole batch, so channels keep their offsets
    relative to each other (the output is not zero-mean per channel)."""
    layer = BatchGroupNorm(CHANNELS, 1, affine=False).double()
    x, _ = data(0, SPATIAL["2d"])
    y = layer(x)
    close(y, (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + EPS), "G = 1")
    assert y.mean(dim=(0, 2, 3)).abs().max() > 0.5


def test_one_sample_trains(path: str) -> None:
    """A batch of one (N, C) sample, which BatchNorm refuses in training, has C/G values per
    group."""
    layer = BatchGroupNorm(CHANNELS, 2, affine=False).double()
    x = torch.arange(CHANNELS, dtype=torch.float64).view(1, CHANNELS)
    close(layer(x), Reference(2).train_step(x, None, None), "one sample")


# --- gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 3, CHANNELS])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradcheck(groups: int, mode: str, path: str) -> None:
    layer = layer_with_affine(groups)
    layer(data(0, SPATIAL["2d"])[0])  # running statistics away from their initial values
    layer.train(mode == "train")
    x = data(1, (3, 2), batch=3)[0].requires_grad_(True)
    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)

    def function(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(function, (x, weight, bias))


# --- dtypes and memory formats --------------------------------------------------------------


@pytest.mark.parametrize(
    "spatial, memory_format", [("2d", torch.channels_last), ("3d", torch.channels_last_3d)]
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_channels_last_is_kept_and_changes_nothing(
    spatial: str, memory_format: torch.memory_format, mode: str
) -> None:
    results = []
    for fmt in (torch.contiguous_format, memory_format):
        layer = layer_with_affine(2)
        layer(data(0, SPATIAL[spatial])[0])
        layer.train(mode == "train")
        x, grad = data(1, SPATIAL[spatial])
        x = x.contiguous(memory_format=fmt).requires_grad_(True)
        y = layer(x)
        y.backward(grad)
        assert y.is_contiguous(memory_format=fmt)
        results.append((y, x.grad, layer.weight.grad, layer.running_mean))
    for expected, actual in zip(*results, strict=True):
        close(actual, expected, "channels_last")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bfloat16_input_keeps_fp32_statistics(mode: str, path: str) -> None:
    """bf16 in, bf16 out, within bf16 rounding of the formula on the same (rounded) values;
    the running statistics are fp32 and accurate to fp32."""
    layer = BatchGroupNorm(CHANNELS, 3)
    with torch.no_grad():
        layer.weight.copy_(affine()[0])
        layer.bias.copy_(affine()[1])
    reference = Reference(3)
    x, grad = data(0, SPATIAL["2d"])
    x = x.bfloat16()
    weight, bias = affine()
    expected = reference.train_step(x.double(), weight, bias)
    if mode == "eval":
        layer(x)
        layer.eval()
        expected = reference.eval(x.double(), weight, bias)
    x.requires_grad_(True)
    y = layer(x)
    y.backward(grad.bfloat16())
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert layer.running_mean.dtype == torch.float32
    scale = float(expected.abs().max())
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=2 * 2**-8 * scale)
    torch.testing.assert_close(layer.running_var.double(), reference.running_var, rtol=1e-5, atol=0)


# --- bad inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [4, 0, 12, -2])
def test_groups_must_divide_the_channels(groups: int) -> None:
    with pytest.raises(InputError, match=r"BatchGroupNorm has 6 channels.*\[1, 2, 3, 6\]"):
        BatchGroupNorm(CHANNELS, groups)


def test_default_groups_and_channels_without_one() -> None:
    assert [BatchGroupNorm(c).num_groups for c in (256, 64, 48, 16)] == [32, 32, 24, 8]
    with pytest.raises(InputError, match=r"BatchGroupNorm has 3 channels.*num_groups"):
        BatchGroupNorm(3)


def test_input_errors_name_the_layer() -> None:
    layer = BatchGroupNorm(CHANNELS, 2)
    layer._distnorm_name = "stem.bn"
    with pytest.raises(InputError, match=r"BatchGroupNorm 'stem\.bn' has 6 channels.* 4"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(InputError, match=r"BatchGroupNorm 'stem\.bn'.*floating-point"):
        layer(torch.ones(2, CHANNELS, 3, 3, dtype=torch.int64))
    with pytest.raises(InputError, match=r"BatchGroupNorm 'stem\.bn'.*\(N, C, \*\)"):
        layer(torch.randn(CHANNELS))


# --- state_dict and the bridges to BatchNorm ------------------------------------------------


def test_state_dict_has_batchnorm_keys_and_group_statistics() -> None:
    layer = layer_with_affine(3)
    layer(data(0, SPATIAL["2d"])[0])
    state = layer.state_dict()
    assert list(state) == list(nn.BatchNorm2d(CHANNELS).state_dict())
    assert state["weight"].shape == (CHANNELS,) and state["running_var"].shape == (3,)
    copy_ = BatchGroupNorm(CHANNELS, 3).double()
    copy_.load_state_dict(state)
    assert all(torch.equal(v, copy_.state_dict()[k]) for k, v in state.items())
    assert "num_groups=3" in repr(layer)


def reclassed(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """What distnorm.convert does to change a module's class: a new instance sharing the
    module's state, in containers of its own, with no __init__ call."""
    new = object.__new__(cls)
    new.__dict__.update(
        {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()}
    )
    return new


def test_statistics_from_a_trained_batchnorm() -> None:
    """Group statistics from channel ones: the mean of the means, and the mean of the
    variances plus the population variance of the means (law of total variance). For
    statistics of one batch (momentum 1) that is the group's own variance up to O(1/count)."""
    batchnorm = nn.BatchNorm2d(CHANNELS, momentum=1.0).double()
    x, _ = data(0, (16, 16), batch=8)
    batchnorm(x)
    channel_mean, channel_var = batchnorm.running_mean.clone(), batchnorm.running_var.clone()

    layer = reclassed(batchnorm, BatchGroupNorm)
    layer._init_sync_state(None)
    layer._init_group_state(2)
    for group in range(2):
        means, variances = (
            channel_mean[3 * group : 3 * group + 3],
            channel_var[3 * group : 3 * group + 3],
        )
        grand_mean = sum(means) / 3
        total_var = sum(variances) / 3 + sum((m - grand_mean) ** 2 for m in means) / 3
        close(layer.running_mean[group], grand_mean, "group mean")
        close(layer.running_var[group], total_var, "group variance")
    count = x.numel() // 2
    torch.testing.assert_close(
        layer.running_var, x.view(8, 2, -1).var(dim=(0, 2)), rtol=2 / count, atol=0
    )
    # The BatchNorm keeps its own buffers, and the rest of its state is shared.
    assert torch.equal(batchnorm.running_mean, channel_mean) and batchnorm.running_var.shape == (
        CHANNELS,
    )
    assert (
        layer.weight is batchnorm.weight
        and layer.num_batches_tracked is batchnorm.num_batches_tracked
    )
    assert layer.num_groups == 2 and layer._sync is None


@pytest.mark.parametrize(
    "dtype, memory_format",
    [(torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last)],
)
def test_eval_equals_batchnorm_with_expanded_statistics(
    dtype: torch.dtype, memory_format: torch.memory_format
) -> None:
    """Exported as nn.BatchNorm2d holding channel_running_stats(): identical eval outputs."""
    layer = BatchGroupNorm(CHANNELS, 3)
    with torch.no_grad():
        layer.weight.copy_(affine()[0])
        layer.bias.copy_(affine()[1])
    for step in range(STEPS):
        layer(data(step, SPATIAL["2d"])[0].float())
    layer.eval()

    exported = reclassed(layer, nn.BatchNorm2d)
    exported.running_mean, exported.running_var = layer.channel_running_stats()
    assert exported.running_mean.shape == (CHANNELS,)
    assert torch.equal(exported.running_var[2:4], layer.running_var[1].expand(2))

    x = data(STEPS, SPATIAL["2d"])[0].to(dtype).contiguous(memory_format=memory_format)
    expected, actual = exported(x), layer(x)
    assert torch.equal(actual, expected) and actual.dtype == dtype
    assert actual.is_contiguous(memory_format=memory_format)
    assert layer.running_mean.shape == (3,)  # the layer's own buffers are untouched
