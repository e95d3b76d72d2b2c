"""What a converted model sends during one training step: exactly one all-reduce per
SyncBatchNorm in forward and one in backward, nothing else, and the same bytes at world
size 2 and 4 (torch's SyncBatchNorm all-gathers W * (2C + 1) values per layer instead).
Every collective of a layer is one persistent buffer of 2C + 1 values (two sums per
channel and a count); with the mismatch check (the default) it also carries the tag.

Collectives are counted by wrapping the real ``torch.distributed`` functions for the
duration of a step; every call still goes through to gloo.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distnorm
from distnorm import comm
from tests.multiprocess import recorded_collectives, run_on_ranks

CHANNELS = (8, 16, 10)


def small_cnn() -> nn.Module:
    c1, c2, c3 = CHANNELS
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, c3), nn.BatchNorm1d(c3),
    )  # fmt: skip


def one_step_worker(rank: int, world_size: int) -> dict[bool, dict[str, list[tuple[str, int]]]]:
    return {check: one_step(rank, check) for check in (True, False)}


def one_step(rank: int, check_sync: bool) -> dict[str, list[tuple[str, int]]]:
    torch.manual_seed(0)
    model = distnorm.convert_model(small_cnn(), check_sync=check_sync)
    logs = {}
    for step in ("first", "second"):
        x = torch.randn(2 + rank, 3, 6, 6)
        with recorded_collectives() as logs[f"{step}_forward"]:
            loss = model(x).square().mean()
        with recorded_collectives() as logs[f"{step}_backward"]:
            loss.backward()
    model.eval()
    with recorded_collectives() as logs["eval_forward"]:
        model(torch.randn(2, 3, 6, 6))
    return {key: [(call.name, call.nbytes) for call in log] for key, log in logs.items()}


@pytest.fixture(scope="module")
def logs_by_world_size() -> dict[int, list[dict]]:
    return {w: run_on_ranks(one_step_worker, w) for w in (2, 4)}


def forward_bytes(check_sync: bool) -> int:
    """2C + 1 values, and the tag when checked."""
    tag = comm.TAG_SIZE if check_sync else 0
    return sum(4 * (2 * c + 1 + tag) for c in CHANNELS)


def backward_bytes(check_sync: bool) -> int:
    """2C values and the count, in the forward's buffer layout."""
    return forward_bytes(check_sync)


def shift_bytes(check_sync: bool) -> int:
    """C + 1 values, padded to the forward's 2C + 1 (and tagged when checked)."""
    return forward_bytes(check_sync)


CHECKS = pytest.mark.parametrize("check_sync", [True, False], ids=["checked", "unchecked"])


@CHECKS
@pytest.mark.parametrize("world_size", [2, 4])
def test_one_all_reduce_per_layer_each_way(
    logs_by_world_size, world_size: int, check_sync: bool
) -> None:
    for runs in logs_by_world_size[world_size]:
        logs = runs[check_sync]
        forward, backward = logs["second_forward"], logs["second_backward"]
        assert [name for name, _ in forward] == ["all_reduce"] * len(CHANNELS)
        assert [name for name, _ in backward] == ["all_reduce"] * len(CHANNELS)
        assert sum(size for _, size in forward) == forward_bytes(check_sync)
        assert sum(size for _, size in backward) == backward_bytes(check_sync)


def test_payload_does_not_grow_with_world_size(logs_by_world_size) -> None:
    per_size = {
        w: {(check, key, tuple(log)) for runs in all_runs for check, logs in runs.items()
            for key, log in logs.items()}
        for w, all_runs in logs_by_world_size.items()
    }  # fmt: skip
    assert per_size[2] == per_size[4]


def test_eval_mode_does_not_communicate(logs_by_world_size) -> None:
    for runs in logs_by_world_size[2]:
        assert runs[True]["eval_forward"] == runs[False]["eval_forward"] == []


@CHECKS
def test_first_step_agrees_on_a_shift_once(logs_by_world_size, check_sync: bool) -> None:
    """The documented one-off: a layer's first training forward adds one all-reduce of
    C + 1 values (padded to 2C + 1, and tagged when checked) to agree on the shift its sums
    are taken about."""
    for runs in logs_by_world_size[4]:
        logs = runs[check_sync]
        first = logs["first_forward"]
        assert [name for name, _ in first] == ["all_reduce"] * (2 * len(CHANNELS))
        assert sum(size for _, size in first) == forward_bytes(check_sync) + shift_bytes(check_sync)
        assert logs["first_backward"] == logs["second_backward"]
