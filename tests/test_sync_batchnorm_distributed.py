"""SyncBatchNorm on real gloo processes equals single-process BatchNorm on the concatenated
batch, computed in float64: outputs, input gradients, weight/bias gradients summed over
ranks, running statistics and num_batches_tracked, over several steps, for uneven and
empty per-rank batches, world sizes 2, 3 and 4, and 1d/2d/3d inputs.

Each world size is spawned once (a module-scoped fixture) and runs every case; the tests
then compare one case each against the reference built here in the parent process.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import distnorm
from tests.multiprocess import run_on_ranks

CHANNELS = 3
STEPS = 3
SPATIAL = {"0d": (), "1d": (5,), "2d": (4, 3), "2d_channels_last": (4, 3), "3d": (3, 2, 2)}
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
SPLITS = {
    2: [(1, 1), (3, 0), (2, 5)],
    3: [(5, 0, 3), (1, 1, 1), (0, 4, 2)],
    4: [(1, 1, 1, 1), (4, 0, 0, 3), (2, 3, 1, 2)],
}


@dataclass(frozen=True)
class Case:
    """One configuration, run for STEPS training steps with fresh data each step."""

    split: tuple[int, ...]
    spatial: str
    dtype: str
    momentum: float | None = 0.1
    affine: bool = True
    bias: bool = True
    device: str = "cpu"

    @property
    def id(self) -> str:
        batches = "-".join(map(str, self.split))
        where = "" if self.device == "cpu" else f"/{self.device}"
        flags = f"m={self.momentum}/affine={self.affine}" + ("" if self.bias else "/no-bias")
        return f"{batches}/{self.spatial}/{self.dtype}/{flags}{where}"


def cases_for(world_size: int) -> list[Case]:
    cases = [
        Case(split, spatial, dtype)
        for split, spatial, dtype in itertools.product(
            SPLITS[world_size], SPATIAL, ("float64", "float32")
        )
    ]
    first = SPLITS[world_size][0]
    cases += [
        Case(first, "2d", "float64", momentum=None),
        Case(first, "1d", "float64", affine=False),
        Case(SPLITS[world_size][-1], "3d", "float64", bias=False),
        Case(SPLITS[world_size][-1], "2d_channels_last", "bfloat16"),
    ]
    return cases


def step_data(case: Case, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global input and upstream gradient of one step, rounded to the case's dtype.

    Channel means sit several standard deviations from zero and drift by a quarter of one
    per step, as a BatchNorm's input does in training, so that the per-channel bookkeeping
    and the shift carried from step to step (the previous global mean) are both exercised."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{case.id}/{step}".encode()))
    shape = (sum(case.split), CHANNELS, *SPATIAL[case.spatial])
    channel = [1, CHANNELS] + [1] * len(SPATIAL[case.spatial])
    scale = torch.tensor([2.0, 0.5, 1.0]).view(channel)
    mean = torch.tensor([3.0, -4.0, 5.0]).view(channel) * scale * (1 + 0.25 * step)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + mean
    grad = torch.randn(shape, generator=generator, dtype=torch.float64)
    dtype = DTYPES[case.dtype]
    return x.to(dtype).double(), grad.to(dtype).double()


def initial_affine(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return (
        1 + 0.1 * torch.randn(CHANNELS, generator=generator, dtype=torch.float64),
        0.1 * torch.randn(CHANNELS, generator=generator, dtype=torch.float64),
    )


def run_case_on_rank(case: Case, rank: int, group: object | None = None) -> list[dict]:
    """This rank's part of ``case``: its slice of each step's batch through a SyncBatchNorm."""
    dtype = DTYPES[case.dtype]
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    device = torch.device(case.device)
    layer = distnorm.SyncBatchNorm(
        CHANNELS, momentum=case.momentum, affine=case.affine, process_group=group, bias=case.bias
    ).to(device, stats_dtype)
    with torch.no_grad():
        for parameter, value in zip((layer.weight, layer.bias), initial_affine(case), strict=True):
            if parameter is not None:
                parameter.copy_(value)
    start = sum(case.split[:rank])
    rows = slice(start, start + case.split[rank])
    results = []
    for step in range(STEPS):
        x_global, grad_global = step_data(case, step)
        x = x_global[rows].to(device, dtype)
        if case.spatial == "2d_channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        layer.zero_grad()
        y = layer(x)
        y.backward(grad_global[rows].to(device, dtype))
        results.append(
            {
                "output": y.detach().double().cpu(),
                "output_dtype": y.dtype,
                "channels_last": y.is_contiguous(memory_format=torch.channels_last),
                "grad_input": x.grad.double().cpu(),
                "grad_weight": None if layer.weight is None else layer.weight.grad.double().cpu(),
                "grad_bias": None if layer.bias is None else layer.bias.grad.double().cpu(),
                "running_mean": layer.running_mean.double().cpu().clone(),
                "running_var": layer.running_var.double().cpu().clone(),
                "num_batches_tracked": int(layer.num_batches_tracked),
            }
        )
    return results


def all_cases_worker(rank: int, world_size: int, cases: list[Case]) -> dict[str, list[dict]]:
    return {case.id: run_case_on_rank(case, rank) for case in cases}


def reference_steps(case: Case, rows: slice | None = None) -> list[dict]:
    """torch's own BatchNorm, single process, float64, on the concatenated batch (or on
    the ``rows`` of it that form one sync group)."""
    running_mean = torch.zeros(CHANNELS, dtype=torch.float64)
    running_var = torch.ones(CHANNELS, dtype=torch.float64)
    weight, bias = initial_affine(case)
    weight = weight if case.affine else None
    bias = bias if case.affine and case.bias else None
    results = []
    for step in range(STEPS):
        x, grad = step_data(case, step)
        if rows is not None:
            x, grad = x[rows], grad[rows]
        params = [None if p is None else p.clone().requires_grad_(True) for p in (weight, bias)]
        x.requires_grad_(True)
        num_batches_tracked = step + 1
        momentum = 1.0 / num_batches_tracked if case.momentum is None else case.momentum
        y = F.batch_norm(x, running_mean, running_var, *params, True, momentum, 1e-5)
        y.backward(grad)
        results.append(
            {
                "output": y.detach(),
                "batch_var": x.detach().var(dim=[0, *range(2, x.dim())], unbiased=False),
                "weight": weight,
                "grad_output": grad,
                "grad_input": x.grad,
                "grad_weight": None if params[0] is None else params[0].grad,
                "grad_bias": None if params[1] is None else params[1].grad,
                "running_mean": running_mean.clone(),
                "running_var": running_var.clone(),
                "num_batches_tracked": num_batches_tracked,
            }
        )
    return results


def assert_matches_reference(case: Case, per_rank: list[list[dict]], reference: list[dict]) -> None:
    """float64: 1e-10 absolute. float32: 1e-5 relative to the magnitude of the operands;
    for the input gradient those are ``|w| / sigma * |g|`` per channel, not the result,
    which is a difference of O(1) terms that nearly cancel when a channel holds few values
    (at 2 values per channel it is ~1e-3 and even torch's own fp32 kernel misses it by
    ~4e-6). bfloat16: outputs to bf16 rounding, statistics (kept in fp32) to 1e-5."""
    relative = {"float64": 0.0, "float32": 1e-5, "bfloat16": 1.6e-2}[case.dtype]
    stats_relative = 1e-5 if case.dtype == "bfloat16" else relative

    def close(
        actual: torch.Tensor, expected: torch.Tensor, scale: float, rel: float, what: str
    ) -> None:
        atol = 1e-10 if case.dtype == "float64" else rel * scale
        torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=what)

    for step, expected in enumerate(reference):
        got = [ranks[step] for ranks in per_rank]
        where = f"{case.id} step {step}"
        sigma = (expected["batch_var"] + 1e-5).sqrt()
        weight = expected["weight"].abs() if case.affine else torch.ones_like(sigma)
        input_grad_scale = float((weight / sigma).max() * expected["grad_output"].abs().max())
        output = expected["output"]
        close(
            torch.cat([g["output"] for g in got]),
            output,
            float(output.abs().max()),
            relative,
            f"{where} output",
        )
        close(
            torch.cat([g["grad_input"] for g in got]),
            expected["grad_input"],
            input_grad_scale,
            relative,
            f"{where} grad_input",
        )
        for key in ("grad_weight", "grad_bias"):
            if expected[key] is None:
                assert all(g[key] is None for g in got), f"{where} {key}"
                continue
            summed = torch.stack([g[key] for g in got]).sum(0)
            close(
                summed, expected[key], float(expected[key].abs().max()), relative, f"{where} {key}"
            )
        for key in ("running_mean", "running_var"):
            for rank, g in enumerate(got):
                close(
                    g[key],
                    expected[key],
                    float(expected[key].abs().max()),
                    stats_relative,
                    f"{where} {key} rank {rank}",
                )
        assert all(g["num_batches_tracked"] == expected["num_batches_tracked"] for g in got)
        assert all(g["output_dtype"] == DTYPES[case.dtype] for g in got)
        if case.spatial == "2d_channels_last":
            assert all(g["channels_last"] for g in got if g["output"].size(0) > 1)


@pytest.fixture(scope="module")
def results_by_world_size() -> dict[int, dict[str, list[list[dict]]]]:
    computed: dict[int, dict[str, list[list[dict]]]] = {}

    def results(world_size: int) -> dict[str, list[list[dict]]]:
        if world_size not in computed:
            per_rank = run_on_ranks(all_cases_worker, world_size, cases_for(world_size))
            computed[world_size] = {
                case_id: [rank_results[case_id] for rank_results in per_rank]
                for case_id in per_rank[0]
            }
        return computed[world_size]

    return results  # type: ignore[return-value]


@pytest.mark.parametrize(
    "world_size, case",
    [(w, c) for w in SPLITS for c in cases_for(w)],
    ids=lambda value: value.id if isinstance(value, Case) else f"W{value}",
)
def test_matches_single_process_batchnorm(
    results_by_world_size, world_size: int, case: Case
) -> None:
    per_rank = results_by_world_size(world_size)[case.id]
    assert_matches_reference(case, per_rank, reference_steps(case))


def test_empty_rank_gets_zero_parameter_gradients(results_by_world_size) -> None:
    """The rank with no samples joined both collectives and contributed nothing."""
    case = Case((5, 0, 3), "2d", "float64")
    empty_rank = results_by_world_size(3)[case.id][1]
    for step in empty_rank:
        assert step["output"].shape[0] == 0
        assert torch.equal(step["grad_weight"], torch.zeros(CHANNELS, dtype=torch.float64))
        assert torch.equal(step["grad_bias"], torch.zeros(CHANNELS, dtype=torch.float64))


# --- sync groups: statistics of each group's batch, not the world's -------------------

GROUP_CASE = Case((2, 3, 1, 2), "2d", "float64")


def sync_group_worker(rank: int, world_size: int) -> list[dict]:
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both
    return run_case_on_rank(GROUP_CASE, rank, group=groups[rank // 2])


def test_sync_groups_use_their_own_batch() -> None:
    per_rank = run_on_ranks(sync_group_worker, 4)
    split = GROUP_CASE.split
    for members in ((0, 1), (2, 3)):
        rows = slice(sum(split[: members[0]]), sum(split[: members[-1] + 1]))
        # The reference's rows are the group's concatenated batch; splitting it among the
        # group's members mirrors how the worker sliced it.
        reference = reference_steps(GROUP_CASE, rows)
        got = [per_rank[r] for r in members]
        assert_matches_reference(GROUP_CASE, got, reference)
    first, second = per_rank[0][0]["running_mean"], per_rank[2][0]["running_mean"]
    assert not torch.allclose(first, second), "the two groups should see different statistics"
