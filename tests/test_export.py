"""torch.export: a converted model in eval mode exports as it is, and so does its reverted,
plain-torch form; the exported programs compute what the modules compute."""

from __future__ import annotations

import copy

import pytest
import torch

import distnorm
from distnorm.examples import small_resnet


@pytest.mark.parametrize("norm", ["sync_bn", "gn_ws", "frozen_bn", "bcn", "bgn"])
def test_converted_and_reverted_models_export(norm: str) -> None:
    torch.manual_seed(0)
    model = distnorm.convert_model(small_resnet(), norm=norm)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        model.train()(x)  # statistics off their defaults
    model.eval()
    for module in (model, distnorm.revert_model(copy.deepcopy(model)).eval()):
        program = torch.export.export(module, (x,))
        torch.testing.assert_close(program.module()(x), module(x))
