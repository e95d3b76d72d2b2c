"""The variance SyncBatchNorm uses across ranks is stable in fp32: inputs with mean 1e3 and
standard deviation 1e-2 per channel (|mean| / std = 1e5), where ``E[x^2] - E[x]^2`` in fp32 has
no correct digit left.

The variance "used" is read back through ``momentum=1``: the running variance is then the
unbiased variance of the last (global) batch, which is what normalized the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import distnorm
from tests.multiprocess import run_on_ranks

SPLIT = (3, 5)
CHANNELS = 4
MEANS = torch.tensor([1e3, -1e3, 3e2, 1e3 + 7.0], dtype=torch.float64)


def large_mean_batch(seed: int, mean: torch.Tensor = MEANS, std: float = 1e-2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(SPLIT), CHANNELS, 4, 4, generator=generator, dtype=torch.float64)
    return (x * std + mean.view(1, -1, 1, 1)).float()  # the fp32 data is the ground truth


def unbiased_variance_float64(x: torch.Tensor) -> torch.Tensor:
    return x.double().var(dim=(0, 2, 3), unbiased=True)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((actual.double() - expected) / expected).abs().max())


def variance_used_worker(
    rank: int, world_size: int, batches: list[torch.Tensor]
) -> list[torch.Tensor]:
    layer = distnorm.SyncBatchNorm(CHANNELS, momentum=1.0)
    rows = slice(sum(SPLIT[:rank]), sum(SPLIT[: rank + 1]))
    used = []
    for batch in batches:
        layer(batch[rows])
        used.append(layer.running_var.clone())
    return used


def test_large_mean_variance_matches_float64_across_ranks() -> None:
    batch = large_mean_batch(seed=0)
    per_rank = run_on_ranks(variance_used_worker, 2, [batch])
    expected = unbiased_variance_float64(batch)
    for used in per_rank:
        assert relative_error(used[0], expected) < 1e-3


def test_one_process_is_torchs_batchnorm_bit_for_bit() -> None:
    """With no peers a converted model must compute exactly what it did before conversion,
    so SyncBatchNorm hands off to torch's kernel: same outputs, gradients and statistics,
    bit for bit. (Its precision is then torch's: about 2e-3 relative on this batch on CPU.)"""
    batch = large_mean_batch(seed=1)
    torch_layer = torch.nn.BatchNorm2d(CHANNELS, momentum=1.0)
    ours = distnorm.SyncBatchNorm(CHANNELS, momentum=1.0)
    results = []
    for layer in (torch_layer, ours):
        x = batch.clone().requires_grad_(True)
        y = layer(x)
        y.backward(torch.ones_like(y).cumsum(0))
        results.append((y, x.grad, layer.weight.grad, layer.running_mean, layer.running_var))
    for expected, actual in zip(*results, strict=True):
        assert torch.equal(expected, actual)


def test_naive_formula_fails_the_same_check() -> None:
    """The check above discriminates: per-rank fp32 sums of x and x^2, summed across ranks
    and combined as E[x^2] - E[x]^2 (what an all-reduce of raw sums gives) miss badly."""
    batch = large_mean_batch(seed=0)
    parts = batch.split(list(SPLIT))
    total = sum(p.sum(dim=(0, 2, 3)) for p in parts)
    total_sq = sum((p * p).sum(dim=(0, 2, 3)) for p in parts)
    count = batch.numel() // CHANNELS
    naive = (total_sq / count - (total / count) ** 2) * count / (count - 1)
    assert relative_error(naive, unbiased_variance_float64(batch)) > 1e-3


def test_precision_recovers_one_step_after_the_mean_jumps() -> None:
    """The ranks' statistics are combined about the previous step's mean. A moderate drift
    (30 standard deviations in one step) keeps the precision of the first step; a jump of 1e4
    standard deviations may cost that step's, and the next step, about the new mean, has it
    back."""
    first = large_mean_batch(seed=2)
    drifted = large_mean_batch(seed=3, mean=MEANS + 30 * 1e-2)
    jumped = large_mean_batch(seed=4, mean=MEANS + 1e4 * 1e-2)
    after_jump = large_mean_batch(seed=5, mean=MEANS + 1e4 * 1e-2)
    used = run_on_ranks(variance_used_worker, 2, [first, drifted, jumped, after_jump])
    for per_step in used:
        assert relative_error(per_step[1], unbiased_variance_float64(drifted)) < 1e-3
        assert relative_error(per_step[3], unbiased_variance_float64(after_jump)) < 1e-3


def test_reference_helper_agrees_with_torch() -> None:
    """Sanity of the reference itself: torch's float64 BatchNorm uses the same variance."""
    batch = large_mean_batch(seed=6).double()
    running_var = torch.ones(CHANNELS, dtype=torch.float64)
    F.batch_norm(
        batch, torch.zeros(CHANNELS, dtype=torch.float64), running_var, training=True, momentum=1.0
    )
    torch.testing.assert_close(running_var, unbiased_variance_float64(batch), rtol=1e-8, atol=0)
