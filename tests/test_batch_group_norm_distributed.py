"""BatchGroupNorm on real gloo processes equals Batch Group Normalization of the concatenated
batch, written out in float64 in this file: outputs, input gradients, weight/bias gradients
summed over ranks, running statistics (identical on every rank) and num_batches_tracked, over
several steps, for uneven and empty per-rank batches at world sizes 2 and 3; and each step
all-reduces 2G + 1 values forward and 2G backward (plus the mismatch check's padding and
tag), whatever the world size.

Each world size is spawned once (a module-scoped fixture) and runs every case.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

from distnorm import comm
from distnorm.layers.batch_group_norm import BatchGroupNorm
from tests.multiprocess import recorded_collectives, run_on_ranks

CHANNELS = 6
STEPS = 3
EPS = 1e-5
SPATIAL = {"0d": (), "1d": (5,), "2d": (4, 3), "3d": (3, 2, 2)}
SPLITS = {2: [(1, 1), (3, 0)], 3: [(5, 0, 3), (0, 4, 2)]}
DTYPES = {"float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    split: tuple[int, ...]
    spatial: str
    groups: int
    dtype: str = "float64"
    momentum: float | None = 0.1
    affine: bool = True
    channels_last: bool = False
    device: str = "cpu"

    @property
    def id(self) -> str:
        batches = "-".join(map(str, self.split))
        layout = "/channels_last" if self.channels_last else ""
        where = "" if self.device == "cpu" else f"/{self.device}"
        return (
            f"{batches}/{self.spatial}{layout}/G={self.groups}/{self.dtype}/"
            f"m={self.momentum}/affine={self.affine}{where}"
        )


def cases_for(world_size: int) -> list[Case]:
    cases = []
    for split in SPLITS[world_size]:
        cases += [
            Case(split, "0d", 2),
            Case(split, "1d", 3),
            Case(split, "2d", 2),
            Case(split, "2d", 2, channels_last=True),
            Case(split, "3d", 1),
            Case(split, "2d", CHANNELS),
        ]
    first, last = SPLITS[world_size]
    cases += [
        Case(first, "2d", 3, momentum=None),
        Case(first, "1d", 2, affine=False),
        Case(last, "2d", 3, dtype="bfloat16", channels_last=True),
    ]
    return cases


def step_data(case: Case, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global input and upstream gradient of one step, rounded to the case's dtype. Channels
    of one group differ in mean and scale, and the means drift from step to step."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{case.id}/{step}".encode()))
    spatial = SPATIAL[case.spatial]
    shape = (sum(case.split), CHANNELS, *spatial)
    channel = [1, CHANNELS] + [1] * len(spatial)
    scale = torch.tensor([2.0, 0.5, 1.0, 3.0, 1.5, 0.25], dtype=torch.float64).view(channel)
    mean = torch.tensor([3.0, -4.0, 5.0, 1.0, 0.0, -2.0], dtype=torch.float64).view(channel)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    x = x + mean * scale * (1 + 0.25 * step)
    grad = torch.randn(shape, generator=generator, dtype=torch.float64)
    dtype = DTYPES[case.dtype]
    return x.to(dtype).double(), grad.to(dtype).double()


def initial_affine() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return (
        1 + 0.1 * torch.randn(CHANNELS, generator=generator, dtype=torch.float64),
        0.1 * torch.randn(CHANNELS, generator=generator, dtype=torch.float64),
    )


# --- worker side ------------------------------------------------------------------------------


def run_case_on_rank(case: Case, rank: int) -> dict:
    dtype, device = DTYPES[case.dtype], torch.device(case.device)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    layer = BatchGroupNorm(CHANNELS, case.groups, momentum=case.momentum, affine=case.affine).to(
        device, stats_dtype
    )
    if case.affine:
        with torch.no_grad():
            layer.weight.copy_(initial_affine()[0])
            layer.bias.copy_(initial_affine()[1])
    start = sum(case.split[:rank])
    rows = slice(start, start + case.split[rank])
    memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
    steps = []
    for step in range(STEPS):
        x_global, grad_global = step_data(case, step)
        x = x_global[rows].to(device, dtype).contiguous(memory_format=memory_format)
        x.requires_grad_(True)
        layer.zero_grad()
        with recorded_collectives() as forward_log:
            y = layer(x)
        with recorded_collectives() as backward_log:
            y.backward(grad_global[rows].to(device, dtype))
        steps.append(
            {
                "output": y.detach().double().cpu(),
                "output_dtype": y.dtype,
                "output_format_kept": y.is_contiguous(memory_format=memory_format),
                "grad_input": x.grad.double().cpu(),
                "grad_weight": None if layer.weight is None else layer.weight.grad.double().cpu(),
                "grad_bias": None if layer.bias is None else layer.bias.grad.double().cpu(),
                "running_mean": layer.running_mean.cpu().clone(),
                "running_var": layer.running_var.cpu().clone(),
                "num_batches_tracked": int(layer.num_batches_tracked),
                "forward_collectives": [(c.name, c.numel) for c in forward_log],
                "backward_collectives": [(c.name, c.numel) for c in backward_log],
            }
        )
    layer.eval()
    x_eval = step_data(case, STEPS)[0][rows].to(device, dtype)
    with recorded_collectives() as eval_log:
        eval_output = layer(x_eval.contiguous(memory_format=memory_format))
    eval_collectives = [(c.name, c.numel) for c in eval_log]
    return {
        "steps": steps,
        "eval_output": eval_output.double().cpu(),
        "eval_collectives": eval_collectives,
    }


def all_cases_worker(rank: int, world_size: int, cases: list[Case]) -> dict[str, dict]:
    return {case.id: run_case_on_rank(case, rank) for case in cases}


# --- reference: the paper's formula on the concatenated batch, float64 ------------------------


def normalize(x, mean, var, groups, weight, bias) -> torch.Tensor:
    grouped = x.reshape(x.size(0), groups, -1)
    xhat = (grouped - mean.view(1, -1, 1)) / torch.sqrt(var.view(1, -1, 1) + EPS)
    xhat = xhat.reshape(x.shape)
    channel = [1, -1] + [1] * (x.dim() - 2)
    return xhat if weight is None else xhat * weight.view(channel) + bias.view(channel)


def reference(case: Case) -> dict:
    groups = case.groups
    running_mean = torch.zeros(groups, dtype=torch.float64)
    running_var = torch.ones(groups, dtype=torch.float64)
    weight, bias = initial_affine() if case.affine else (None, None)
    steps = []
    for step in range(STEPS):
        x, grad = step_data(case, step)
        x.requires_grad_(True)
        params = [None if p is None else p.clone().requires_grad_(True) for p in (weight, bias)]
        grouped = x.reshape(x.size(0), groups, -1)
        mean = grouped.mean(dim=(0, 2))
        var = grouped.var(dim=(0, 2), unbiased=False)
        y = normalize(x, mean, var, groups, *params)
        y.backward(grad)
        count = grouped.size(0) * grouped.size(2)
        dims = [0, *range(2, x.dim())]
        xhat = normalize(x.detach(), mean.detach(), var.detach(), groups, None, None)
        sigma = torch.sqrt(var.detach() + EPS).repeat_interleave(CHANNELS // groups)
        w = torch.ones(CHANNELS, dtype=torch.float64) if weight is None else weight.abs()
        factor = 1 / (step + 1) if case.momentum is None else case.momentum
        running_mean = (1 - factor) * running_mean + factor * mean.detach()
        running_var = (1 - factor) * running_var + factor * var.detach() * count / (count - 1)
        steps.append(
            {
                "output": y.detach(),
                # What each result is a sum or difference of, for the bf16 tolerances.
                "grad_input_scale": float((w / sigma).max() * grad.abs().max()),
                "grad_weight_scale": float((grad.abs() * xhat.abs()).sum(dims).max()),
                "grad_bias_scale": float(grad.abs().sum(dims).max()),
                "grad_input": x.grad,
                "grad_weight": None if params[0] is None else params[0].grad,
                "grad_bias": None if params[1] is None else params[1].grad,
                "running_mean": running_mean,
                "running_var": running_var,
                "num_batches_tracked": step + 1,
            }
        )
    x_eval = step_data(case, STEPS)[0]
    return {
        "steps": steps,
        "eval_output": normalize(x_eval, running_mean, running_var, groups, weight, bias),
    }


def assert_matches_reference(case: Case, per_rank: list[dict], expected: dict) -> None:
    """float64: 1e-10 absolute. bfloat16: a few bf16 roundings (2^-9 each) of the magnitude
    of what each result is made of (for the input gradient ``|w| / sigma * |g|``, not the
    result, a difference of nearly cancelling terms); statistics (fp32) to 1e-5 relative."""
    bf16 = case.dtype == "bfloat16"

    def close(actual, wanted, what, scale=None, rel=4 * 2**-9) -> None:
        if scale is None:
            scale = float(wanted.abs().max())
        atol = rel * scale if bf16 else 1e-10
        torch.testing.assert_close(actual.double(), wanted, rtol=0, atol=atol, msg=what)

    for step, want in enumerate(expected["steps"]):
        got = [ranks["steps"][step] for ranks in per_rank]
        where = f"{case.id} step {step}"
        close(torch.cat([g["output"] for g in got]), want["output"], f"{where} output")
        close(
            torch.cat([g["grad_input"] for g in got]),
            want["grad_input"],
            f"{where} grad input",
            scale=want["grad_input_scale"],
        )
        for key in ("grad_weight", "grad_bias"):
            if want[key] is None:
                assert all(g[key] is None for g in got), f"{where} {key}"
            else:
                summed = torch.stack([g[key] for g in got]).sum(0)
                close(summed, want[key], f"{where} {key}", scale=want[f"{key}_scale"])
        for key in ("running_mean", "running_var"):
            close(got[0][key], want[key], f"{where} {key}", rel=1e-5)
            assert all(torch.equal(g[key], got[0][key]) for g in got), f"{where} {key} differs"
        assert all(g["num_batches_tracked"] == want["num_batches_tracked"] for g in got)
        assert all(g["output_dtype"] == DTYPES[case.dtype] for g in got)
        assert all(g["output_format_kept"] for g in got if g["output"].size(0) > 1)
    close(
        torch.cat([ranks["eval_output"] for ranks in per_rank]),
        expected["eval_output"],
        f"{case.id} eval output",
    )


@pytest.fixture(scope="module")
def results_by_world_size():
    computed: dict[int, dict[str, list[dict]]] = {}

    def results(world_size: int) -> dict[str, list[dict]]:
        if world_size not in computed:
            per_rank = run_on_ranks(all_cases_worker, world_size, cases_for(world_size))
            computed[world_size] = {
                case_id: [rank_results[case_id] for rank_results in per_rank]
                for case_id in per_rank[0]
            }
        return computed[world_size]

    return results


ALL_CASES = [(w, c) for w in SPLITS for c in cases_for(w)]


def case_id(value: object) -> str:
    return value.id if isinstance(value, Case) else f"W{value}"


@pytest.mark.parametrize("world_size, case", ALL_CASES, ids=case_id)
def test_matches_the_formula_on_the_concatenated_batch(
    results_by_world_size, world_size: int, case: Case
) -> None:
    assert_matches_reference(case, results_by_world_size(world_size)[case.id], reference(case))


@pytest.mark.parametrize("world_size, case", ALL_CASES, ids=case_id)
def test_one_all_reduce_of_2g_plus_1_values_forward_and_2g_backward(
    results_by_world_size, world_size: int, case: Case
) -> None:
    """Per step: [2G + 1] forward (after a first call's one-off, agreeing on the shift) and
    [2G] backward, on every rank, the empty ones included; nothing in eval. The mismatch
    check (on by default) pads each collective to 2G + 1 values and adds its tag."""
    size = 2 * case.groups + 1 + comm.TAG_SIZE
    for rank_results in results_by_world_size(world_size)[case.id]:
        steps = rank_results["steps"]
        assert steps[0]["forward_collectives"] == [("all_reduce", size), ("all_reduce", size)]
        for step in steps[1:]:
            assert step["forward_collectives"] == [("all_reduce", size)]
        for step in steps:
            assert step["backward_collectives"] == [("all_reduce", size)]
        assert rank_results["eval_collectives"] == []


def test_empty_rank_gets_zero_parameter_gradients(results_by_world_size) -> None:
    """The rank with no samples joined both collectives and contributed nothing."""
    empty_rank = results_by_world_size(3)[Case((5, 0, 3), "2d", 2).id][1]
    for step in empty_rank["steps"]:
        assert step["output"].shape[0] == 0
        assert torch.equal(step["grad_weight"], torch.zeros(CHANNELS, dtype=torch.float64))
        assert torch.equal(step["grad_bias"], torch.zeros(CHANNELS, dtype=torch.float64))
