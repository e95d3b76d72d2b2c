"""A converted model trained under DistributedDataParallel follows single-process training
on the concatenated batch step for step.

This is the end-to-end property users rely on: SyncBatchNorm's backward all-reduce runs
while DDP's gradient buckets are being reduced on the same process group, and DDP
broadcasts buffers from rank 0 before each forward. With equal per-rank batches DDP's
averaged gradient is the gradient of the global mean loss, so after every SGD step the
parameters and running statistics must equal those of one process training on the
whole batch, to float64 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import distnorm
from tests.multiprocess import run_on_ranks

PER_RANK_BATCH = 3
STEPS = 4


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x + self.bn(self.conv(x)))

    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        Block(), Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4),
    ).double()  # fmt: skip


def batches(world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    size = world_size * PER_RANK_BATCH
    return [
        (
            torch.randn(size, 2, 5, 5, generator=generator, dtype=torch.float64) * 2 + 1,
            torch.randint(0, 4, (size,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def train(model: nn.Module, steps: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for images, labels in steps:
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model


def ddp_worker(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    model = distnorm.convert_model(tiny_resnet())
    rows = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
    local = [(images[rows], labels[rows]) for images, labels in batches(world_size)]
    train(DistributedDataParallel(model), local)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_ddp_training_follows_single_process_training() -> None:
    world_size = 2
    per_rank = run_on_ranks(ddp_worker, world_size)
    reference = train(tiny_resnet(), batches(world_size)).state_dict()
    for rank, state in enumerate(per_rank):
        assert state.keys() == reference.keys()
        for key, expected in reference.items():
            torch.testing.assert_close(
                state[key], expected, rtol=0, atol=1e-10, msg=f"rank {rank}: {key}"
            )
