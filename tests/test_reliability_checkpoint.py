"""Checkpoints: a converted model's state_dict loads into the unconverted model and back,
strictly, with the same eval outputs; and training that moves between world sizes through
a checkpoint (1 process, then 3 gloo processes with uneven and empty batches, then 1
process of plain, unconverted torch) continues the running statistics exactly: they end
as nn.BatchNorm's on the concatenated batches of every step, written out here in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distnorm
from tests.multiprocess import run_on_ranks

CHANNELS = 3
SPLIT = (3, 0, 2)  # the global batch of 5 rows on the 3 ranks
STEPS = {"first": range(0, 2), "distributed": range(2, 4), "last": range(4, 6)}


class Pair(nn.Module):
    """A 2d BatchNorm with momentum 0.1 and a cumulative one (momentum None), whose update
    depends on num_batches_tracked, the count a checkpoint must carry."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.BatchNorm2d(CHANNELS)
        self.b = nn.BatchNorm2d(CHANNELS, momentum=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def global_batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    rows = sum(SPLIT)
    return torch.randn(rows, CHANNELS, 2, 2, generator=generator, dtype=torch.float64) * 2 + 3


def train(model: nn.Module, steps: range, rows: slice = slice(None)) -> None:
    for step in steps:
        x = global_batch(step)[rows].requires_grad_(True)
        model(x).square().sum().backward()


def resume_on_three_ranks(rank: int, world_size: int, checkpoint: dict) -> dict:
    model = distnorm.convert_model(Pair()).double()
    model.load_state_dict(checkpoint, strict=True)
    start = sum(SPLIT[:rank])
    train(model, STEPS["distributed"], slice(start, start + SPLIT[rank]))
    return model.state_dict()


def expected_state() -> dict[str, torch.Tensor]:
    mean = {key: torch.zeros(CHANNELS, dtype=torch.float64) for key in "ab"}
    var = {key: torch.ones(CHANNELS, dtype=torch.float64) for key in "ab"}
    steps = [step for block in STEPS.values() for step in block]
    for count, step in enumerate(steps, start=1):
        x = global_batch(step)
        for key, factor in (("a", 0.1), ("b", 1 / count)):
            mean[key] = (1 - factor) * mean[key] + factor * x.mean(dim=(0, 2, 3))
            var[key] = (1 - factor) * var[key] + factor * x.var(dim=(0, 2, 3), unbiased=True)
    state = {}
    for key in "ab":
        state[f"{key}.running_mean"], state[f"{key}.running_var"] = mean[key], var[key]
        state[f"{key}.num_batches_tracked"] = torch.tensor(len(steps))
    return state


def test_training_moves_between_world_sizes_through_checkpoints() -> None:
    first = distnorm.convert_model(Pair()).double()
    train(first, STEPS["first"])  # one process: no peers
    states = run_on_ranks(resume_on_three_ranks, 3, first.state_dict(), timeout_s=60)
    for state in states[1:]:  # every rank, the empty one included, holds the same statistics
        assert all(torch.equal(state[key], value) for key, value in states[0].items())

    last = Pair().double()  # plain torch, unconverted
    last.load_state_dict(states[0], strict=True)
    train(last, STEPS["last"])
    for key, value in expected_state().items():
        torch.testing.assert_close(last.state_dict()[key], value, rtol=1e-12, atol=1e-12)


def plain_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 5), nn.BatchNorm1d(5)
    )


@pytest.mark.parametrize("norm", ["sync_bn", "frozen_bn"])
def test_state_dict_loads_into_the_unconverted_model_and_back(norm: str) -> None:
    """BatchGroupNorm and BatchChannelNorm hold other statistics: they go back through
    distnorm.revert_model (tests/test_convert_norms.py)."""
    x = torch.randn(3, 3, 5, 5)
    plain = plain_net()
    plain(torch.randn(4, 3, 5, 5))  # running statistics off their initial values
    converted = distnorm.convert_model(plain_net(), norm=norm)
    converted.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(converted.eval()(x), plain.eval()(x))

    converted.train()(torch.randn(4, 3, 5, 5))
    back = plain_net()
    back.load_state_dict(converted.state_dict(), strict=True)
    assert torch.equal(back.eval()(x), converted.eval()(x))
