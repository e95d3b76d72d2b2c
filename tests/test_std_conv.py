"""WSConv1d/2d/3d against Weight Standardization written out in float64 in this file.

Qiao et al. (2019), arXiv:1903.10520, Sec. 3: each output filter W[i, :] of I values is
replaced by (W[i, :] - mu_i) / sigma_i before the convolution. "paper": sigma_i =
sqrt(1/I sum (W - mu)^2 + eps); "official" (the authors' PyTorch code): sigma_i =
sqrt(1/(I-1) sum (W - mu)^2) + eps.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from distnorm.errors import InputError
from distnorm.layers.std_conv import WSConv1d, WSConv2d, WSConv3d

WS_CLASSES = {1: WSConv1d, 2: WSConv2d, 3: WSConv3d}
CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FUNCTIONAL_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
VARIANTS = ("paper", "official")


def reference_standardize(weight: torch.Tensor, eps: float, variant: str) -> torch.Tensor:
    """W_hat in float64, one loop-free row per output filter."""
    rows = weight.detach().double().reshape(weight.shape[0], -1)
    count = rows.shape[1]
    mu = rows.sum(dim=1, keepdim=True) / count
    squared_deviations = ((rows - mu) ** 2).sum(dim=1, keepdim=True)
    if variant == "paper":
        sigma = torch.sqrt(squared_deviations / count + eps)
    else:
        sigma = torch.sqrt(squared_deviations / (count - 1)) + eps
    return ((rows - mu) / sigma).reshape(weight.shape)


def reference_output(layer: nn.Module, x: torch.Tensor, dims: int) -> torch.Tensor:
    """The layer's convolution, in float64, with the reference standardized weight."""
    weight = reference_standardize(layer.weight, layer.eps, layer.variant)
    bias = None if layer.bias is None else layer.bias.detach().double()
    return FUNCTIONAL_CONVS[dims](
        x.double(), weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups
    )


def make_layer(dims: int, variant: str, groups: int = 1, **kwargs: object) -> nn.Module:
    torch.manual_seed(dims * 10 + groups)
    layer = WS_CLASSES[dims](
        4, 6, 3, stride=2, padding=1, dilation=1, groups=groups, variant=variant, **kwargs
    )
    with torch.no_grad():  # filters with a mean far from 0 and unequal scales
        layer.weight.mul_(torch.rand(6).add(0.5).view(-1, *[1] * (dims + 1))).add_(0.3)
    return layer


def make_input(dims: int, batch: int = 2, channels: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(dims)
    return torch.randn(batch, channels, *[7] * dims, generator=generator)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("groups", [1, 2])
def test_matches_float64_formula_in_train_and_eval(dims: int, variant: str, groups: int) -> None:
    layer = make_layer(dims, variant, groups)
    x = make_input(dims)
    expected = reference_output(layer, x, dims)

    train_output = layer.train()(x)
    eval_output = layer.eval()(x)

    torch.testing.assert_close(train_output.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(train_output, eval_output)  # no state: both modes compute the same
    torch.testing.assert_close(
        layer.standardized_weight().double(),
        reference_standardize(layer.weight, layer.eps, variant),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_standardized_filters_have_zero_mean_and_unit_scale(variant: str) -> None:
    layer = make_layer(2, variant, eps=1e-12)
    rows = layer.standardized_weight().detach().double().flatten(1)
    torch.testing.assert_close(
        rows.mean(dim=1), torch.zeros(6, dtype=torch.float64), atol=1e-6, rtol=0
    )
    unbiased = variant == "official"
    torch.testing.assert_close(
        rows.var(dim=1, unbiased=unbiased), torch.ones(6, dtype=torch.float64), rtol=1e-5, atol=0
    )


def test_variants_differ_and_default_eps_follows_the_variant() -> None:
    paper, official = make_layer(2, "paper"), make_layer(2, "official")
    assert (paper.eps, official.eps) == (1e-6, 1e-5)
    assert paper.variant == "paper" and official.variant == "official"
    fan_in = paper.weight[0].numel()
    ratio = paper.standardized_weight() / official.standardized_weight()
    # sigma_unbiased / sigma_biased = sqrt(I / (I - 1)), up to the eps terms
    torch.testing.assert_close(
        ratio, torch.full_like(ratio, math.sqrt(fan_in / (fan_in - 1))), rtol=1e-3, atol=0
    )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dims,groups", [(1, 1), (2, 2), (3, 1)])
def test_gradcheck_input_and_weight_float64(dims: int, variant: str, groups: int) -> None:
    torch.manual_seed(0)
    layer = WS_CLASSES[dims](4, 4, 2, padding=1, groups=groups, variant=variant).double()
    x = torch.randn(2, 4, *[3] * dims, dtype=torch.float64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)

    def run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(run, (x, weight, bias))


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_flows_through_the_mean(variant: str) -> None:
    """W_hat does not change when a constant is added to a filter, so the weight gradient
    of every filter sums to zero; a layer that detached mu (or standardized outside autograd)
    would not have this property."""
    layer = make_layer(2, variant).double()
    x = make_input(2).double()
    layer(x).square().sum().backward()
    per_filter = layer.weight.grad.flatten(1)
    assert per_filter.abs().max() > 1e-3
    torch.testing.assert_close(
        per_filter.sum(dim=1), torch.zeros(6, dtype=torch.float64), atol=1e-9, rtol=0
    )


def test_state_dict_keys_match_conv2d_and_load_both_ways() -> None:
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 6, 3, padding=1)
    ws = WSConv2d(4, 6, 3, padding=1)
    assert list(ws.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]

    ws.load_state_dict(plain.state_dict())  # strict
    assert torch.equal(ws.weight, plain.weight) and torch.equal(ws.bias, plain.bias)
    fresh = nn.Conv2d(4, 6, 3, padding=1)
    fresh.load_state_dict(ws.state_dict())
    assert torch.equal(fresh.weight, plain.weight)

    no_bias = WSConv2d(4, 6, 3, bias=False)
    assert list(no_bias.state_dict()) == list(nn.Conv2d(4, 6, 3, bias=False).state_dict())


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_standardized_weight_in_a_plain_conv_gives_identical_outputs(
    dims: int, padding_mode: str
) -> None:
    layer = make_layer(dims, "paper", padding_mode=padding_mode).eval()
    plain = CONV_CLASSES[dims](4, 6, 3, stride=2, padding=1, padding_mode=padding_mode).eval()
    with torch.no_grad():
        plain.weight.copy_(layer.standardized_weight())
        plain.bias.copy_(layer.bias)
    x = make_input(dims)
    assert not torch.allclose(plain.weight, layer.weight)
    assert torch.equal(layer(x), plain(x))


def test_padding_mode_is_applied() -> None:
    layer = make_layer(2, "paper", padding_mode="reflect")
    x = make_input(2)
    expected = F.conv2d(
        F.pad(x.double(), (1, 1, 1, 1), mode="reflect"),
        reference_standardize(layer.weight, layer.eps, "paper"),
        layer.bias.detach().double(),
        stride=2,
    )
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
def test_bad_eps_is_refused(eps: float) -> None:
    with pytest.raises(InputError, match="eps must be a finite number > 0"):
        WSConv2d(4, 6, 3, eps=eps)


def test_bad_variant_and_single_weight_filters_are_refused() -> None:
    with pytest.raises(InputError, match="variant must be one of"):
        WSConv2d(4, 6, 3, variant="timm")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="single weight per filter"):
        WSConv2d(4, 4, 1, groups=4)  # depthwise 1x1: every filter would become 0


def test_integer_input_is_refused() -> None:
    with pytest.raises(InputError, match="floating-point"):
        WSConv2d(4, 6, 3)(torch.ones(1, 4, 5, 5, dtype=torch.int64))


def test_bf16_input_standardizes_in_fp32_and_convolves_in_bf16() -> None:
    layer = make_layer(2, "paper")
    x = make_input(2)
    output = layer(x.bfloat16())
    assert output.dtype == torch.bfloat16
    expected = reference_output(layer, x.bfloat16(), 2)
    torch.testing.assert_close(output.double(), expected, rtol=3e-2, atol=3e-2)
    output.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32


def test_bf16_weights_are_standardized_in_fp32() -> None:
    """Filters around 10 with a spread of 0.1: in bf16 (8 significant bits) ``W - mu`` and
    the variance would lose most of their digits; standardized in fp32 the result is the
    float64 one rounded once to bf16."""
    torch.manual_seed(0)
    layer = WSConv2d(16, 8, 3, variant="paper")
    with torch.no_grad():
        layer.weight.normal_(0, 0.1).add_(10.0)
    layer = layer.bfloat16()
    result = layer.standardized_weight()
    assert result.dtype == torch.bfloat16
    expected = reference_standardize(layer.weight, layer.eps, "paper")
    torch.testing.assert_close(result.double(), expected, rtol=2**-8, atol=2**-8)

    output = layer(make_input(2, channels=16).bfloat16())
    assert output.dtype == torch.bfloat16 and torch.isfinite(output).all()


def test_channels_last_is_preserved() -> None:
    layer = make_layer(2, "paper")
    x = make_input(2)
    contiguous_output = layer(x)

    output = layer(x.to(memory_format=torch.channels_last))
    assert output.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(output, contiguous_output)

    layer = layer.to(memory_format=torch.channels_last)
    assert layer.standardized_weight().is_contiguous(memory_format=torch.channels_last)
    output = layer(x.to(memory_format=torch.channels_last))
    assert output.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(output, contiguous_output)


def test_reclassed_conv_works_after_init_standardization() -> None:
    """How convert.py turns an existing conv into a WSConv: re-class, then set WS state."""
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 6, 3, padding=1)
    reclassed = object.__new__(WSConv2d)
    reclassed.__dict__.update(plain.__dict__)
    x = make_input(2)

    # Class-level defaults already make it usable; _init_standardization sets the choice.
    built = WSConv2d(4, 6, 3, padding=1)
    built.load_state_dict(plain.state_dict())
    assert torch.equal(reclassed(x), built(x))

    reclassed._init_standardization(1e-3, "official")
    assert (reclassed.eps, reclassed.variant) == (1e-3, "official")
    assert reclassed.weight is plain.weight
    built._init_standardization(1e-3, "official")
    assert torch.equal(reclassed(x), built(x))


def test_extra_repr_shows_eps_and_variant() -> None:
    text = repr(WSConv2d(4, 6, 3, eps=1e-8, variant="official", padding_mode="reflect"))
    assert "eps=1e-08" in text and "variant='official'" in text
    assert "padding_mode=reflect" in text and "kernel_size=(3, 3)" in text
