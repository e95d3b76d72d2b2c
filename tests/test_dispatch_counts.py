"""What a steady training step of a synchronized layer dispatches, on 2 real gloo ranks:
at most 40 kernel operations for SyncBatchNorm and BatchGroupNorm, 60 for BatchChannelNorm
and for SyncBatchNorm accumulating over micro-batches (forward + backward, views and
allocations not counted), with the mismatch check and the non-finite guard on, and no host
read in any layer; the whole model reads the host once per step (distnorm.health's
report), whatever its depth.

Counts are deterministic, so they are asserted here; benchmarks/dispatch.py publishes
them beside nn.BatchNorm2d's. On CUDA each operation is a kernel launch and each host read
a device synchronization, which is why they are budgeted.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distnorm
from benchmarks import dispatch
from tests.multiprocess import run_on_ranks


@pytest.fixture(scope="module")
def per_layer() -> list[list[dict]]:
    return run_on_ranks(dispatch.count_layers, 2, (4, 16, 6, 6), list(dispatch.LAYERS))


def test_synchronized_layers_stay_within_their_budgets(per_layer) -> None:
    for records in per_layer:
        for record in records:
            if record["layer"] == "bn":
                continue
            where = f"{record['layer']} {record['layout']}: {record['by_op']}"
            assert record["ops"] <= dispatch.BUDGETS[record["layer"]], where
            assert record["host_reads"] == 0, where
            # The checks are on: a tag check (and the non-finite flag) per collective.
            assert record["by_op"].get("aten.addmv_.default", 0) >= 2, where
            assert record["report_ops"] == 2 and record["report_reads"] == 1, where


def test_counts_do_not_depend_on_the_rank(per_layer) -> None:
    first, second = ([(r["layer"], r["layout"], r["ops"]) for r in rank] for rank in per_layer)
    assert first == second


def deep_model_reads(rank: int, world_size: int) -> dict[str, int]:
    """Host reads in one steady step of a model with 7 synchronized layers of 3 kinds."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for norm in ("sync_bn", "bgn", "bcn", "sync_bn", "bgn", "bcn", "sync_bn"):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
        layers[-2] = distnorm.convert_model(layers[-2], norm=norm, num_groups=2)
    model = nn.Sequential(*layers)
    x = torch.randn(2 + rank, 8, 5, 5)
    counter = dispatch.count_step(model, x, torch.ones_like(x))
    return {"layer_reads": counter.host_reads, "report_reads": counter.report_reads}


def test_the_whole_model_reads_the_host_once_per_step() -> None:
    for reads in run_on_ranks(deep_model_reads, 2):
        assert reads == {"layer_reads": 0, "report_reads": 1}
