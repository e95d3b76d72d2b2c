"""BatchChannelNorm on real gloo processes equals the float64 Batch-Channel Normalization
of the concatenated batch (the reference of tests/test_batch_channel_norm.py), in both the
micro-batch (estimated) and the large-batch mode: outputs, input gradients, parameter
gradients summed over ranks, and the estimates / running statistics, which must also be
bit-identical on every rank; for uneven, empty and all-empty per-rank batches, world sizes
2 and 3, sync groups smaller than the world, several steps and then eval. And what it
sends: one fp32 all-reduce of 2C + 1 values (and the mismatch check's tag) per micro-batch
training step (bf16 input too), nothing in backward or eval.

Each world size is spawned once (a module-scoped fixture) and runs every case.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from distnorm import comm
from tests.multiprocess import recorded_collectives, run_on_ranks
from tests.test_batch_channel_norm import (
    CHANNELS,
    MODES,
    PARAMETERS,
    SPATIAL,
    STEPS,
    initial_parameters,
    initial_state,
    make_layer,
    reference_step,
    step_data,
)

SPLITS = {
    2: [(1, 1), (3, 0), (2, 5)],
    3: [(5, 0, 3), (0, 4, 2), (1, 1, 1)],
}
LAYOUTS = {**SPATIAL, "2d_channels_last": (4, 3)}
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """STEPS training steps with fresh data each, then one eval step."""

    split: tuple[int, ...]
    mode: str
    layout: str = "2d"
    dtype: str = "float64"
    device: str = "cpu"

    @property
    def id(self) -> str:
        where = "" if self.device == "cpu" else f"/{self.device}"
        return f"{'-'.join(map(str, self.split))}/{self.mode}/{self.layout}/{self.dtype}{where}"


def cases_for(world_size: int) -> list[Case]:
    splits = SPLITS[world_size]
    cases = [Case(split, mode) for split, mode in itertools.product(splits, MODES)]
    cases += [
        Case(splits[0], mode, layout)
        for mode, layout in itertools.product(MODES, LAYOUTS)
        if layout != "2d"
    ]
    cases += [Case(splits[-1], mode, dtype="float32") for mode in MODES]
    # bf16 in the micro-batch mode, whose passes are distnorm's own (the large-batch mode's
    # batch part is SyncBatchNorm's core, tested in bf16 there).
    cases += [Case(splits[-1], "estimated", "2d_channels_last", "bfloat16")]
    if world_size == 2:
        cases += [Case((0, 0), mode) for mode in MODES]  # the whole group's batch is empty
    return cases


def rows_of(case: Case, rank: int) -> slice:
    start = sum(case.split[:rank])
    return slice(start, start + case.split[rank])


def run_case_on_rank(case: Case, rank: int, group: object = None) -> list[dict]:
    dtype, device = DTYPES[case.dtype], torch.device(case.device)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    layer = make_layer(MODES[case.mode], stats_dtype, process_group=group).to(device)
    results = []
    for step in range(STEPS + 1):
        layer.train(step < STEPS)
        x_global, grad_global = step_data(case.id, step, sum(case.split), LAYOUTS[case.layout])
        x = x_global[rows_of(case, rank)].to(device, dtype)
        if case.layout == "2d_channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        layer.zero_grad()
        y = layer(x)
        y.backward(grad_global[rows_of(case, rank)].to(device, dtype))
        results.append(
            {
                "output": y.detach().double().cpu(),
                "output_dtype": y.dtype,
                "channels_last": y.is_contiguous(memory_format=torch.channels_last),
                "grad_input": x.grad.double().cpu(),
                **{f"grad_{k}": getattr(layer, k).grad.double().cpu() for k in PARAMETERS},
                "running_mean": layer.running_mean.cpu().clone(),
                "running_var": layer.running_var.cpu().clone(),
                "num_batches_tracked": int(layer.num_batches_tracked),
            }
        )
    return results


# --- counting collectives ------------------------------------------------------------------


def communication_on_rank(rank: int) -> dict[str, list]:
    """What one micro-batch fp32 layer sends: each training forward and backward (an fp32
    then a bf16 input), and eval."""
    layer = make_layer(estimated=True, dtype=torch.float32)
    logs = {}
    for step in range(2):
        dtype = (torch.float32, torch.bfloat16)[step]  # fp32 communication either way
        x = step_data("communication", step, 2 + rank, (4, 3))[0].to(dtype).requires_grad_(True)
        with recorded_collectives() as logs[f"forward {step}"]:
            y = layer(x)
        with recorded_collectives() as logs[f"backward {step}"]:
            y.sum().backward()
    layer.eval()
    with recorded_collectives() as logs["eval"]:
        layer(step_data("communication", 2, 2, (4, 3))[0].float())
    return {key: [(call.name, call.numel, call.dtype) for call in log] for key, log in logs.items()}


# Sync groups {0, 1} and {2} of a world of 3: each group's statistics, not the world's.
GROUP_SPLIT = (2, 3, 1)
GROUP_MEMBERS = ((0, 1), (2,))


def all_cases_worker(rank: int, world_size: int, cases: list[Case]) -> dict:
    results = {case.id: run_case_on_rank(case, rank) for case in cases}
    if world_size == 3:
        groups = [dist.new_group(list(members)) for members in GROUP_MEMBERS]  # every rank
        group = groups[0] if rank in GROUP_MEMBERS[0] else groups[1]
        for mode in MODES:
            case = Case(GROUP_SPLIT, mode)
            results[f"groups/{case.id}"] = run_case_on_rank(case, rank, group)
    return {"cases": results, "communication": communication_on_rank(rank)}


@pytest.fixture(scope="module")
def results_by_world_size():
    computed: dict[int, list[dict]] = {}

    def results(world_size: int) -> list[dict]:
        if world_size not in computed:
            computed[world_size] = run_on_ranks(all_cases_worker, world_size, cases_for(world_size))
        return computed[world_size]

    return results


# --- the reference: one process, float64, the concatenated batch --------------------------


def reference_steps(case: Case, rows: slice = slice(None)) -> list[dict]:
    """The reference on the concatenated batch, or on the ``rows`` of it that form one
    sync group."""
    state, params = initial_state(), initial_parameters()
    results = []
    for step in range(STEPS + 1):
        x, grad = step_data(case.id, step, sum(case.split), LAYOUTS[case.layout])
        x, grad = x[rows], grad[rows]
        x = x.to(DTYPES[case.dtype]).double()  # the data each rank holds, exactly
        grad = grad.to(DTYPES[case.dtype]).double()
        expected = reference_step(
            x, grad, state, params, estimated=MODES[case.mode], training=step < STEPS
        )
        state = expected["state"]
        results.append(expected)
    return results


@pytest.mark.parametrize(
    "world_size, case",
    [(w, c) for w in SPLITS for c in cases_for(w)],
    ids=lambda value: value.id if isinstance(value, Case) else f"W{value}",
)
def test_matches_single_process_float64_on_the_concatenated_batch(
    results_by_world_size, world_size: int, case: Case
) -> None:
    per_rank = [rank["cases"][case.id] for rank in results_by_world_size(world_size)]
    assert_matches_reference(case, per_rank, reference_steps(case))


def assert_matches_reference(case: Case, per_rank: list[list[dict]], reference: list) -> None:
    # float64: 1e-10. float32: relative to the operands' magnitude (outputs and gradients
    # are O(1) here, the estimates O(10)); bfloat16 inputs: a few bf16 roundings (2^-9 each)
    # of it. What is exact in every dtype is that every rank holds the same estimates.
    tolerance = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 4 * 2**-9}[case.dtype]

    def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        scale = 1.0 if case.dtype == "float64" else max(1.0, float(expected.abs().max()))
        torch.testing.assert_close(
            actual.double(), expected, rtol=0, atol=tolerance * scale, msg=what
        )

    for step, expected in enumerate(reference):
        got = [ranks[step] for ranks in per_rank]
        where = f"{case.id} step {step}"
        close(torch.cat([g["output"] for g in got]), expected["output"], f"{where} output")
        close(torch.cat([g["grad_input"] for g in got]), expected["grad_input"], f"{where} dx")
        for key in (f"grad_{k}" for k in PARAMETERS):
            summed = torch.stack([g[key] for g in got]).sum(dim=0)
            close(summed, expected[key], f"{where} {key} summed over ranks")
        for key, state_key in (("running_mean", "mean"), ("running_var", "var")):
            for rank, g in enumerate(got):
                assert torch.equal(g[key], got[0][key]), f"{where} {key}: rank {rank} differs"
            close(got[0][key], expected["state"][state_key], f"{where} {key}")
        assert all(g["num_batches_tracked"] == min(step + 1, STEPS) for g in got), where
        assert all(g["output_dtype"] == DTYPES[case.dtype] for g in got), where
        if case.layout == "2d_channels_last":
            assert all(g["channels_last"] for g in got if g["output"].size(0) > 1), where


@pytest.mark.parametrize("mode", list(MODES))
def test_sync_groups_use_their_own_batch(results_by_world_size, mode: str) -> None:
    case = Case(GROUP_SPLIT, mode)
    per_rank = [rank["cases"][f"groups/{case.id}"] for rank in results_by_world_size(3)]
    for members in GROUP_MEMBERS:
        rows = slice(sum(GROUP_SPLIT[: members[0]]), sum(GROUP_SPLIT[: members[-1] + 1]))
        group_case = Case(tuple(GROUP_SPLIT[r] for r in members), mode)
        reference = reference_steps(case, rows)
        assert_matches_reference(group_case, [per_rank[r] for r in members], reference)
    first, last = per_rank[0][0]["running_mean"], per_rank[2][0]["running_mean"]
    assert not torch.allclose(first, last), "the two groups should see different statistics"


def test_empty_rank_gets_zero_parameter_gradients(results_by_world_size) -> None:
    for mode in MODES:
        empty_rank = results_by_world_size(3)[1]["cases"][Case((5, 0, 3), mode).id]
        for step in empty_rank:
            assert step["output"].shape[0] == 0
            for key in PARAMETERS:
                assert not step[f"grad_{key}"].any(), f"{mode} {key}"


def test_all_empty_group_batch_leaves_the_statistics_alone(results_by_world_size) -> None:
    state = initial_state()
    for mode in MODES:
        for rank in results_by_world_size(2):
            last = rank["cases"][Case((0, 0), mode).id][-1]
            assert torch.equal(last["running_mean"], state["mean"]), mode
            assert torch.equal(last["running_var"], state["var"]), mode


@pytest.mark.parametrize("world_size", list(SPLITS))
def test_one_all_reduce_of_2c_plus_1_values_per_training_step(
    results_by_world_size, world_size: int
) -> None:
    for rank in results_by_world_size(world_size):
        logs = rank["communication"]
        for step in range(2):
            size = 2 * CHANNELS + 1 + comm.TAG_SIZE
            assert logs[f"forward {step}"] == [("all_reduce", size, torch.float32)]
            assert logs[f"backward {step}"] == []
        assert logs["eval"] == []
