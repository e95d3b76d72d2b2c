"""Half-precision parameters beside fp32 running statistics, as FSDP2's mixed precision
(``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``) leaves a layer: it casts parameters
and never buffers. torch's BatchNorm kernels refuse that mix; every distnorm layer
normalizes as it does with fp32 parameters. test_fsdp2.py runs the same under FSDP2."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import distnorm


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm", ["sync_bn", "bgn", "bcn", "frozen_bn", "gn_ws"])
def test_bf16_parameters_beside_fp32_running_statistics(norm: str, training: bool) -> None:
    torch.manual_seed(0)
    model = distnorm.convert_model(nn.Sequential(nn.BatchNorm2d(8)), norm=norm, num_groups=2)
    with torch.no_grad():
        model.train()(torch.randn(6, 8, 5, 5) + 1)  # running statistics off their defaults
        for parameter in model.parameters():  # values bf16 holds exactly
            parameter.copy_(torch.empty_like(parameter).uniform_(0.5, 1.5).bfloat16())
    x = torch.randn(4, 8, 5, 5).bfloat16()
    expected = copy.deepcopy(model).train(training)(x)
    for parameter in model.parameters():
        parameter.data = parameter.data.bfloat16()
    assert all(buffer.dtype != torch.bfloat16 for buffer in model.buffers())
    output = model.train(training)(x)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output, expected)
