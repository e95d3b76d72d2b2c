"""FrozenBatchNorm against BatchNorm's inference formula written out in float64, and against
the eval output of the BatchNorm it came from."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import distnorm
from distnorm.layers import FrozenBatchNorm


def trained_batchnorm(channels: int = 4, dims: int = 2) -> nn.Module:
    """A BatchNorm whose statistics and affine are not at their initial values."""
    torch.manual_seed(0)
    layer = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](channels).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1.0, 1.0)
    for _ in range(3):
        layer(torch.randn(6, channels, *([5] * dims), dtype=torch.float64) * 3 + 2)
    return layer


def inference_formula(x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """Ioffe & Szegedy, Algorithm 2: y = scale * x + (beta - scale * E[x]),
    scale = gamma / sqrt(Var[x] + eps)."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.detach() - bn.running_mean * scale
    return x * scale.view(shape) + shift.view(shape)


def frozen_copy(bn: nn.Module) -> FrozenBatchNorm:
    frozen = FrozenBatchNorm(bn.num_features, eps=bn.eps).double()
    frozen.load_state_dict(bn.state_dict())
    return frozen


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_the_inference_formula_in_both_modes(dims: int, mode: str) -> None:
    bn = trained_batchnorm(dims=dims)
    frozen = frozen_copy(bn).train(mode == "train")
    x = torch.randn(3, 4, *([6] * dims), dtype=torch.float64)
    torch.testing.assert_close(frozen(x), inference_formula(x, bn), rtol=0, atol=1e-12)


def test_training_changes_nothing_and_gives_no_parameter_gradients() -> None:
    frozen = frozen_copy(trained_batchnorm()).train()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    frozen.weight.requires_grad_(True)  # even if a user unfreezes it, nothing reaches it
    frozen(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert frozen.weight.grad is None and frozen.bias.grad is None
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())


def test_gradcheck_input() -> None:
    frozen = frozen_copy(trained_batchnorm())
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(frozen, (x,))


def test_identical_to_the_batchnorms_eval_output_and_back() -> None:
    bn = trained_batchnorm().float()
    x = torch.randn(3, 4, 5, 5)
    expected = bn.eval()(x)
    model = distnorm.convert_model(nn.Sequential(copy.deepcopy(bn).train()), norm="frozen_bn")
    assert type(model[0]) is distnorm.FrozenBatchNorm2d
    assert list(model.state_dict()) == ["0." + k for k in bn.state_dict()]
    assert torch.equal(model.train()(x), expected)
    assert not any(p.requires_grad for p in model.parameters())
    reverted = distnorm.revert_model(model)
    assert type(reverted[0]) is nn.BatchNorm2d
    assert torch.equal(reverted.eval()(x), expected)
    assert all(p.requires_grad for p in reverted.parameters())


def test_half_precision_and_channels_last_are_kept() -> None:
    frozen = frozen_copy(trained_batchnorm()).float()
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    y = frozen(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert frozen(x).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), frozen(x), rtol=2e-2, atol=2e-2)


def test_bad_input_and_untracked_statistics_are_refused() -> None:
    frozen = FrozenBatchNorm(4)
    with pytest.raises(
        distnorm.InputError, match=r"FrozenBatchNorm.*has 4 channels but its input has 5"
    ):
        frozen(torch.randn(2, 5, 3))
    with pytest.raises(distnorm.InputError, match="track_running_stats=False"):
        FrozenBatchNorm(4, track_running_stats=False)
