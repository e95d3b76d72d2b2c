"""The world layout the policy plans for (arguments, process group, launcher environment)
and the sync groups a plan asks for, created on real gloo processes."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist

import distnorm.policy
from distnorm import comm
from distnorm.errors import DistNormError
from distnorm.examples import small_resnet
from tests.multiprocess import run_on_ranks


@pytest.fixture
def environment(no_launcher_environment: pytest.MonkeyPatch):
    """Set launcher variables on a clean slate (none inherited from the test machine)."""
    monkeypatch = no_launcher_environment

    def set_variables(**values: str) -> None:
        for variable, value in values.items():
            monkeypatch.setenv(variable, value)

    return set_variables


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, (1, 0, None, "single process")),
        (
            {"WORLD_SIZE": "16", "RANK": "9", "LOCAL_WORLD_SIZE": "8"},
            (16, 9, 8, "torchrun environment"),
        ),
        (
            {
                "OMPI_COMM_WORLD_SIZE": "8",
                "OMPI_COMM_WORLD_RANK": "5",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
            },
            (8, 5, 4, "Open MPI environment"),
        ),
        (
            {"PMI_SIZE": "6", "PMI_RANK": "1", "MPI_LOCALNRANKS": "3"},
            (6, 1, 3, "MPICH/PMI environment"),
        ),
        (
            {"SLURM_NTASKS": "32", "SLURM_PROCID": "31", "SLURM_NTASKS_PER_NODE": "4"},
            (32, 31, 4, "SLURM environment"),
        ),
        # torchrun inside SLURM: torchrun's numbers, and never SLURM's tasks per node
        # (which counts torchrun agents, one per node here).
        (
            {"WORLD_SIZE": "16", "RANK": "0", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1"},
            (16, 0, None, "torchrun environment"),
        ),
    ],
)
def test_world_layout_from_the_environment(environment, variables, expected) -> None:
    environment(**variables)
    layout = comm.world_layout()
    assert (layout.world_size, layout.rank, layout.ranks_per_node) == expected[:3]
    assert layout.source.startswith(expected[3])


def test_explicit_arguments_win(environment) -> None:
    environment(WORLD_SIZE="16", RANK="9", LOCAL_WORLD_SIZE="8")
    same = comm.world_layout(16)
    assert (same.world_size, same.rank, same.ranks_per_node) == (16, 9, 8)
    other = comm.world_layout(64)  # planning for another job: its layout is not ours
    assert (other.world_size, other.rank, other.ranks_per_node, other.source) == (
        64,
        0,
        None,
        "arguments",
    )
    assert comm.world_layout(64, 4).ranks_per_node == 4
    assert comm.world_layout(ranks_per_node=2).ranks_per_node == 2


def test_bad_layouts_are_refused(environment) -> None:
    with pytest.raises(DistNormError, match="world size must be at least 1"):
        comm.world_layout(0)
    with pytest.raises(DistNormError, match="ranks per node must be at least 1"):
        comm.world_layout(8, 0)
    environment(WORLD_SIZE="eight")
    with pytest.raises(DistNormError, match="WORLD_SIZE='eight' is not an integer"):
        comm.world_layout()
    environment(WORLD_SIZE="4", RANK="4")
    with pytest.raises(DistNormError, match="rank 4 is outside a world of 4"):
        comm.world_layout()


def test_sync_group_without_a_process_group() -> None:
    assert comm.sync_group(1) is None  # a world of one: the world itself
    with pytest.raises(DistNormError, match="no process group is initialized"):
        comm.sync_group(2)


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def sync_group_worker(rank: int, world_size: int) -> dict:
    pairs = comm.sync_group(2)
    again = comm.sync_group(2)
    world = comm.sync_group(world_size)
    errors = []
    for size in (3, 8, 0):
        try:
            comm.sync_group(size)
        except DistNormError as error:
            errors.append(str(error))
    # The group really is this rank's pair: a sum over it adds the two members' ranks.
    value = torch.tensor([float(rank)])
    comm.all_reduce_sum_(value, pairs)
    layout = comm.world_layout()

    handler = ListHandler()
    logger = logging.getLogger("distnorm")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    plan = distnorm.policy.plan(small_resnet(), 8)  # world size from the process group
    return {
        "members": dist.get_process_group_ranks(pairs),
        "same_object": again is pairs,
        "world_is_none": world is None,
        "errors": errors,
        "pair_sum": value.item(),
        "layout": (layout.world_size, layout.rank, layout.source),
        "plan_world": plan.world_size,
        "plan_groups": plan.sync_group_sizes,
        "log": handler.messages,
    }


def test_sync_groups_on_four_gloo_processes() -> None:
    results = run_on_ranks(sync_group_worker, 4)
    for rank, result in enumerate(results):
        pair = [0, 1] if rank < 2 else [2, 3]
        assert result["members"] == pair
        assert result["same_object"] and result["world_is_none"]
        assert result["pair_sum"] == sum(pair)
        assert result["layout"] == (4, rank, "process group")
        assert (result["plan_world"], result["plan_groups"]) == (4, (4,))
        assert len(result["errors"]) == 3
        assert "cannot make sync groups of 3 ranks in a world of 4" in result["errors"][0]
        assert "divisors of 4: 1, 2, 4" in result["errors"][0]
        assert "of 8 ranks" in result["errors"][1] and "of 0 ranks" in result["errors"][2]
    # The plan is logged once, by rank 0.
    assert len(results[0]["log"]) == 1 and "sync_bn" in results[0]["log"][0]
    assert all(result["log"] == [] for result in results[1:])
