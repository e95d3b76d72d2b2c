"""Activation checkpointing: a forward recomputed in backward (``torch.utils.checkpoint``,
reentrant and not) updates no running statistics, estimates, shift or accumulation window a
second time, and gives the outputs and gradients of the same model without checkpointing.

Each case trains two copies of one model side by side on real gloo ranks (and in one
process, where the layers take torch's kernels), the same data, SGD steps after every
``MICRO`` micro-batches: one copy checkpointed, one not. float64 throughout.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import distnorm
from tests.multiprocess import run_on_ranks

MICRO, STEPS, CHANNELS = 4, 2, 8

NORMS: dict[str, Callable[[], nn.Module]] = {
    "sync_bn": lambda: distnorm.SyncBatchNorm2d(CHANNELS),
    "sync_bn_accumulated": lambda: distnorm.SyncBatchNorm2d(CHANNELS, accumulation_steps=MICRO),
    "bgn": lambda: distnorm.BatchGroupNorm(CHANNELS, num_groups=4),
    "bcn": lambda: distnorm.BatchChannelNorm(CHANNELS, num_groups=2),
    "bcn_batch": lambda: distnorm.BatchChannelNorm(CHANNELS, num_groups=2, estimated=False),
}


class Block(nn.Module):
    def __init__(self, norm: str, reentrant: bool | None) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, CHANNELS, 3, padding=1), NORMS[norm](), nn.ReLU(),
            nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), NORMS[norm](),
        )  # fmt: skip
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant is None:
            return self.body(x)
        return checkpoint(self.body, x, use_reentrant=self.reentrant)


def _train(rank: int, world_size: int, norm: str, reentrant: bool) -> list[dict]:
    """Per micro-batch, the two copies' outputs and gradients; per step, their states."""
    torch.manual_seed(0)
    plain = Block(norm, None).double()
    checkpointed = copy.deepcopy(plain)
    checkpointed.reentrant = reentrant
    records = []
    for model in (plain, checkpointed):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        generator = torch.Generator().manual_seed(rank)
        record: dict = {"outputs": [], "input_grads": [], "states": []}
        for _ in range(STEPS):
            for micro in range(MICRO):
                x = torch.randn(1 + (rank + micro) % 3, 3, 5, 5, generator=generator)
                x = x.double().requires_grad_(True)
                y = model(x)
                (y * torch.cos(y)).sum().backward()
                record["outputs"].append(y.detach())
                record["input_grads"].append(x.grad)
            record["states"].append(
                {
                    **{k: v.clone() for k, v in model.state_dict().items()},
                    **{f"{k}.grad": p.grad.clone() for k, p in model.named_parameters()},
                }
            )
            optimizer.step()
            optimizer.zero_grad()
        records.append(record)
    return records


def _assert_same(plain: dict, checkpointed: dict) -> None:
    for key in ("outputs", "input_grads"):
        for got, expected in zip(checkpointed[key], plain[key], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for got, expected in zip(checkpointed["states"], plain["states"], strict=True):
        assert got.keys() == expected.keys()
        for key in expected:  # running statistics, num_batches_tracked, gradients
            torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("norm", NORMS)
def test_recompute_on_two_ranks_equals_no_checkpoint(norm: str, reentrant: bool) -> None:
    for plain, checkpointed in run_on_ranks(_train, 2, norm, reentrant):
        _assert_same(plain, checkpointed)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("norm", NORMS)
def test_recompute_in_one_process_equals_no_checkpoint(norm: str, reentrant: bool) -> None:
    plain, checkpointed = _train(0, 1, norm, reentrant)
    _assert_same(plain, checkpointed)
    tracked = [v for k, v in checkpointed["states"][-1].items() if "num_batches" in k]
    per_step = 1 if norm == "sync_bn_accumulated" else MICRO
    assert tracked and all(int(t) == STEPS * per_step for t in tracked)
