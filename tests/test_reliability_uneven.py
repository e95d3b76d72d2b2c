"""Uneven numbers of batches at the end of an epoch, on real gloo processes: with
``distnorm.comm.even_steps`` every rank takes the same number of DDP training steps (the
short ranks step on empty batches), nothing hangs, and the running statistics and
parameters are those of single-process float64 training on the concatenated batches that
exist, with DDP's gradient average over all ranks (the default of DDP's own ``join``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import distnorm
from distnorm import comm
from tests.multiprocess import run_on_ranks

WORLD = 2
BATCHES = (3, 2)  # rank 0 has one batch more than rank 1
ROWS = 2
LR = 0.1


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    ).double()  # fmt: skip


def rank_batches(rank: int, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    return [
        torch.randn(ROWS, 3, 4, 4, generator=generator, dtype=torch.float64) for _ in range(count)
    ]


def loss_of(output: torch.Tensor) -> torch.Tensor:
    """The mean squared output; 0 (still connected to every parameter) for an empty batch."""
    return output.square().mean() if len(output) else output.sum() * 0


# --- worker side ------------------------------------------------------------------------------


def train_evenly(rank: int, batches: list[torch.Tensor], **even_steps_options) -> dict:
    model = DistributedDataParallel(distnorm.convert_model(small_net()))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    sizes = []
    for x in comm.even_steps(batches, **even_steps_options):
        optimizer.zero_grad()
        loss_of(model(x)).backward()
        optimizer.step()
        sizes.append(len(x))
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    return {"sizes": sizes, "state": state}


def uneven_cases(rank: int, world_size: int) -> dict:
    results = {"uneven": train_evenly(rank, rank_batches(rank, BATCHES[rank]))}
    # Rank 1 has no batch at all: it needs empty=... to know what an empty batch is.
    own = rank_batches(rank, 2) if rank == 0 else []
    results["none_with_empty"] = train_evenly(
        rank, own, empty=lambda last: torch.empty(0, 3, 4, 4, dtype=torch.float64)
    )
    try:
        train_evenly(rank, own)
        results["none_without_empty"] = None
    except distnorm.DistNormError as error:
        results["none_without_empty"] = str(error)
    return results


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_on_ranks(uneven_cases, WORLD, timeout_s=60)


# --- reference: one process, float64, the batches that exist concatenated ---------------------


def reference(batches_per_rank: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Plain BatchNorm on each step's concatenated batch; the loss is DDP's: the average
    over ranks of each rank's loss (0 for a rank without a batch)."""
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(max(len(batches) for batches in batches_per_rank)):
        present = [batches[step] for batches in batches_per_rank if step < len(batches)]
        output = model(torch.cat(present))
        per_rank = output.split([len(x) for x in present])
        optimizer.zero_grad()
        (sum(loss_of(out) for out in per_rank) / WORLD).backward()
        optimizer.step()
    return model.state_dict()


def assert_state_matches(state: dict, expected: dict) -> None:
    assert list(state) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_every_rank_takes_the_same_number_of_steps(results) -> None:
    assert results[0]["uneven"]["sizes"] == [ROWS, ROWS, ROWS]
    assert results[1]["uneven"]["sizes"] == [ROWS, ROWS, 0]  # the last step on an empty batch


def test_statistics_and_parameters_are_those_of_the_batches_that_exist(results) -> None:
    expected = reference([rank_batches(rank, BATCHES[rank]) for rank in range(WORLD)])
    assert int(expected["1.num_batches_tracked"]) == max(BATCHES)
    for rank_results in results:
        assert_state_matches(rank_results["uneven"]["state"], expected)


def test_a_rank_without_batches_steps_on_the_empty_batch_it_is_given(results) -> None:
    assert results[1]["none_with_empty"]["sizes"] == [0, 0]
    expected = reference([rank_batches(0, 2), []])
    for rank_results in results:
        assert_state_matches(rank_results["none_with_empty"]["state"], expected)


def test_a_rank_that_cannot_make_an_empty_batch_stops_every_rank(results) -> None:
    for rank_results in results:
        message = rank_results["none_without_empty"]
        assert message.startswith("even_steps: 1 rank(s) of world (2 ranks) got no batch at all")
        assert "empty=" in message


def test_empty_batches_keep_the_structure_of_the_last_batch() -> None:
    batch = {"image": torch.ones(3, 2), "labels": [torch.zeros(3), "meta"]}
    empty = comm._empty_like(batch)
    assert empty["image"].shape == (0, 2) and empty["labels"][0].shape == (0,)
    assert empty["labels"][1] == "meta"


def test_without_a_process_group_the_batches_pass_through() -> None:
    batches = [torch.ones(1), torch.zeros(2)]
    assert list(comm.even_steps(batches)) == batches
