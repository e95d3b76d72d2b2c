"""Non-finite batches, on real gloo processes: a NaN or Inf in one rank's batch leaves the
running statistics (SyncBatchNorm, BatchGroupNorm) and estimates (BatchChannelNorm) of
every rank as they were, is not counted in num_batches_tracked, warns once per process
(or raises on every rank with ``nonfinite="raise"``), and training goes on exactly: the
statistics after further steps are those of the finite batches alone, computed here in
float64 from the formulas of nn.BatchNorm, Batch Group Norm and Batch-Channel Norm.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import distnorm
from distnorm.layers import BatchChannelNorm, BatchGroupNorm, SyncBatchNorm
from tests.multiprocess import run_on_ranks

WORLD = 2
CHANNELS = 4
GROUPS = 2
ROWS = (3, 2)  # uneven per-rank batches
MOMENTUM = 0.1
STEPS = 5
# (step, rank) -> the non-finite value put in that rank's batch at that step.
POISON = {(1, 0): float("nan"), (3, 1): float("inf")}


class Pair(nn.Module):
    """Two BatchNorms of the same input, with momentum 0.1 and None (cumulative)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.BatchNorm2d(CHANNELS, momentum=MOMENTUM)
        self.b = nn.BatchNorm2d(CHANNELS, momentum=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def rank_batch(step: int, rank: int, poison: dict) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10 * step + rank)
    x = torch.randn(ROWS[rank], CHANNELS, 2, 2, generator=generator, dtype=torch.float64) * 3 + 5
    if (step, rank) in poison:
        x[0, 1, 1, 0] = poison[(step, rank)]
    return x


def global_batch(step: int) -> torch.Tensor:
    return torch.cat([rank_batch(step, rank, {}) for rank in range(WORLD)])


def finite_steps(poison: dict) -> list[int]:
    return [step for step in range(STEPS) if not any(s == step for s, _ in poison)]


# --- worker side ------------------------------------------------------------------------------


def train(model: nn.Module, rank: int, poison: dict, steps: int = STEPS) -> dict:
    """``steps`` training steps; what each raised, the warnings, the final state."""
    errors, outputs = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            x = rank_batch(step, rank, poison).requires_grad_(True)
            try:
                y = model(x)
                y.square().sum().backward()
                outputs.append(y.detach())
                errors.append(None)
            except distnorm.DistNormError as error:
                errors.append(f"{type(error).__name__}: {error}")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {"errors": errors, "warnings": messages, "state": state, "last_output": outputs[-1]}


def nonfinite_cases(rank: int, world_size: int) -> dict[str, dict]:
    def sync_pair(nonfinite: str) -> nn.Module:
        model = distnorm.convert_model(Pair()).double()
        model.a.nonfinite = model.b.nonfinite = nonfinite
        return model

    # "skip" first: it must not use up the process's one warning.
    results = {"skip": train(sync_pair("skip"), rank, POISON)}
    results["warn"] = train(sync_pair("warn"), rank, POISON)
    results["first_batch"] = train(sync_pair("warn"), rank, {(0, 1): float("nan")})
    results["raise"] = train(sync_pair("raise"), rank, POISON, steps=2)
    bgn = BatchGroupNorm(CHANNELS, GROUPS, momentum=MOMENTUM).double()
    results["bgn"] = train(bgn, rank, POISON)
    bcn = BatchChannelNorm(CHANNELS, num_groups=GROUPS).double()
    results["bcn"] = train(bcn, rank, POISON)
    return results


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_on_ranks(nonfinite_cases, WORLD, timeout_s=60)


# --- references, float64 ----------------------------------------------------------------------


def batchnorm_running(steps: list[int], momentum: float | None) -> tuple[torch.Tensor, ...]:
    mean = torch.zeros(CHANNELS, dtype=torch.float64)
    var = torch.ones(CHANNELS, dtype=torch.float64)
    for count, step in enumerate(steps, start=1):
        x = global_batch(step)
        factor = 1 / count if momentum is None else momentum
        mean = (1 - factor) * mean + factor * x.mean(dim=(0, 2, 3))
        var = (1 - factor) * var + factor * x.var(dim=(0, 2, 3), unbiased=True)
    return mean, var


def group_running(steps: list[int]) -> tuple[torch.Tensor, ...]:
    mean = torch.zeros(GROUPS, dtype=torch.float64)
    var = torch.ones(GROUPS, dtype=torch.float64)
    for step in steps:
        grouped = global_batch(step).reshape(sum(ROWS), GROUPS, -1)
        mean = (1 - MOMENTUM) * mean + MOMENTUM * grouped.mean(dim=(0, 2))
        var = (1 - MOMENTUM) * var + MOMENTUM * grouped.var(dim=(0, 2), unbiased=True)
    return mean, var


def bcn_estimates(steps: list[int], rate: float = 0.1) -> tuple[torch.Tensor, ...]:
    """Qiao et al., Algorithm 1: s^2 about the old estimate, then both moved by r."""
    mean = torch.zeros(CHANNELS, dtype=torch.float64)
    var = torch.ones(CHANNELS, dtype=torch.float64)
    for step in steps:
        x = global_batch(step)
        batch_mean = x.mean(dim=(0, 2, 3))
        about_old = (x - mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3))
        mean, var = mean + rate * (batch_mean - mean), var + rate * (about_old - var)
    return mean, var


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def assert_statistics(
    state: dict, prefix: str, mean: torch.Tensor, var: torch.Tensor, batches: int | None = None
) -> None:
    """A layer's running mean and variance (BatchChannelNorm: its estimates) in ``state``,
    its keys starting with ``prefix``; and, when given, the number of batches it counts."""
    assert_close(state[f"{prefix}running_mean"], mean)
    assert_close(state[f"{prefix}running_var"], var)
    if batches is not None:
        assert int(state[f"{prefix}num_batches_tracked"]) == batches


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["skip", "warn"])
def test_nonfinite_batches_leave_running_statistics_alone_on_every_rank(results, case) -> None:
    steps = finite_steps(POISON)
    for rank_results in results:
        state = rank_results[case]["state"]
        assert rank_results[case]["errors"] == [None] * STEPS
        for index, momentum in (("a", MOMENTUM), ("b", None)):
            assert_statistics(state, f"{index}.", *batchnorm_running(steps, momentum), len(steps))


def test_training_goes_on_exactly_after_a_nonfinite_batch(results) -> None:
    """The shift the sums are taken about is not poisoned: the last step's output is
    BatchNorm of the last global batch with its own statistics."""
    x = global_batch(STEPS - 1)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = 2 * (x - mean) / torch.sqrt(var + 1e-5)  # a(x) + b(x)
    outputs = torch.cat([rank_results["warn"]["last_output"] for rank_results in results])
    assert_close(outputs, expected)


def test_warns_once_per_process_naming_the_layer(results) -> None:
    for rank_results in results:
        assert rank_results["skip"]["warnings"] == []
        (message,) = rank_results["warn"]["warnings"]
        assert message.startswith(
            "SyncBatchNorm2d 'a': a training batch's statistics are not finite"
        )
        assert "nonfinite='raise'" in message


def test_a_nonfinite_first_batch_does_not_poison_the_shift(results) -> None:
    poison = {(0, 1): float("nan")}
    for rank_results in results:
        state = rank_results["first_batch"]["state"]
        assert_statistics(state, "a.", *batchnorm_running(finite_steps(poison), MOMENTUM))


def test_raise_stops_every_rank_at_the_nonfinite_batch_with_statistics_unchanged(results) -> None:
    for rank_results in results:
        first, second = rank_results["raise"]["errors"]
        assert first is None
        assert second.startswith("InputError: SyncBatchNorm2d 'a': a training batch's statistics")
        state = rank_results["raise"]["state"]
        assert_statistics(state, "a.", *batchnorm_running([0], MOMENTUM), batches=1)


def test_batch_group_norm_skips_nonfinite_batches(results) -> None:
    mean, var = group_running(finite_steps(POISON))
    for rank_results in results:
        assert_statistics(rank_results["bgn"]["state"], "", mean, var, len(finite_steps(POISON)))


def test_batch_channel_norm_estimates_skip_nonfinite_batches(results) -> None:
    mean, var = bcn_estimates(finite_steps(POISON))
    for rank_results in results:
        assert_statistics(rank_results["bcn"]["state"], "", mean, var, len(finite_steps(POISON)))


def test_batch_channel_norm_on_one_process_skips_nonfinite_batches_too() -> None:
    """Micro-batch BCN updates its estimates itself even without peers."""
    layer = BatchChannelNorm(CHANNELS, num_groups=GROUPS).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for step in range(STEPS):
            layer(global_batch(step) if step != 2 else global_batch(step) * float("inf"))
    mean, var = bcn_estimates([0, 1, 3, 4])
    assert_close(layer.running_mean, mean)
    assert_close(layer.running_var, var)


def test_unknown_nonfinite_policy_is_refused() -> None:
    with pytest.raises(distnorm.InputError, match="nonfinite='ignore'; choose one of warn, raise"):
        SyncBatchNorm(CHANNELS, nonfinite="ignore")
