"""An empty batch on one rank, for every normalization and grouping, on 2 real gloo
processes: what ``distnorm.even_steps`` hands to a short rank, and what a plan's local
layers (``scratch_fallback: bgn`` among them) see there. The step runs on both ranks, the
empty rank's output is empty and still part of the graph (its loss ``out.sum() * 0``
back-propagates), and the statistics are those of the samples that exist: a synchronized
layer's equal, on both ranks, those of the same layer trained in one process on the
concatenated batches; a local layer's, on the empty rank, those of its own batches, the
empty one counted as torch's BatchNorm counts it (a batch that changes nothing).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distnorm
from distnorm import comm
from tests.multiprocess import run_on_ranks

ROWS = (3, 2)  # per rank, at the steps where both hold samples
EMPTY_STEP = 1  # rank 1's batch is empty at this step
STEPS = 3
# (case, norm, options): every normalization, synchronized over the world or local.
CASES = [
    ("sync_bn", "sync_bn", {}),
    ("sync_bn_local", "sync_bn", {"process_group": comm.LOCAL}),
    ("bgn", "bgn", {"num_groups": 2}),
    ("bgn_local", "bgn", {"num_groups": 2, "process_group": comm.LOCAL}),
    ("bcn", "bcn", {"num_groups": 2}),
    ("bcn_local", "bcn", {"num_groups": 2, "process_group": comm.LOCAL}),
    ("gn_ws", "gn_ws", {"num_groups": 2}),
    ("frozen_bn", "frozen_bn", {}),
    ("bn", "bn", {}),
]
SYNCHRONIZED = {"sync_bn", "bgn", "bcn"}


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).double()


def batch(step: int, rank: int) -> torch.Tensor:
    rows = 0 if (rank, step) == (1, EMPTY_STEP) else ROWS[rank]
    generator = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(rows, 3, 5, 5, generator=generator, dtype=torch.float64) * 2 + 1


def train(norm: str, options: dict, batches: list[torch.Tensor]) -> dict:
    model = distnorm.convert_model(net(), norm=norm, **options)
    sizes = []
    for x in batches:
        x = x.clone().requires_grad_(True)
        y = model(x)
        (y.square().mean() if len(y) else y.sum() * 0).backward()
        sizes.append((tuple(y.shape), x.grad is not None))
    # Running statistics (BCN: its estimates) and batches counted; GroupNorm has neither.
    state = {
        k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k
    }
    return {"sizes": sizes, "state": state}


def every_case(rank: int, world_size: int) -> dict[str, dict]:
    return {
        case: train(norm, options, [batch(step, rank) for step in range(STEPS)])
        for case, norm, options in CASES
    }


@pytest.fixture(scope="module")
def results() -> list[dict[str, dict]]:
    return run_on_ranks(every_case, 2)


@pytest.mark.parametrize("case, norm, options", CASES, ids=[c[0] for c in CASES])
def test_an_empty_rank_trains_and_keeps_exact_statistics(results, case, norm, options) -> None:
    for rank, per_case in enumerate(results):
        sizes = per_case[case]["sizes"]
        assert sizes[EMPTY_STEP][0][0] == (0 if rank == 1 else ROWS[0])
        assert all(has_grad for _, has_grad in sizes)  # the graph reached the input
    if case in SYNCHRONIZED:
        # One process on the concatenated batches: what the synchronized layer computes.
        expected = train(
            norm, options, [torch.cat([batch(s, r) for r in (0, 1)]) for s in range(STEPS)]
        )["state"]
        owners = (0, 1)
    else:
        expected = train(norm, options, [batch(s, 1) for s in range(STEPS)])["state"]
        owners = (1,)
    for rank in owners:
        actual = results[rank][case]["state"]
        assert actual.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(actual[key], value, rtol=1e-10, atol=1e-12, msg=key)
