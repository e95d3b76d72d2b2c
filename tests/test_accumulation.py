"""Gradient accumulation: SyncBatchNorm(accumulation_steps=k) on real gloo processes against
single-process float64 references.

The defined forward: micro-batch t (counted over the whole run) normalizes with the moments
of micro-batches t-k+1..t of every rank of the group, the earlier ones held constant. So
micro-batch k of a step equals nn.BatchNorm on the step's concatenated batch, and running
statistics move once per step as nn.BatchNorm's on that batch. The backward averages its
gradient sums over the same window (see ``_reference``).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import distnorm
from distnorm import comm
from tests.multiprocess import recorded_collectives, run_on_ranks

CHANNELS, SPATIAL, K = 3, (4, 3), 4
# Per step, per micro-batch, per rank: images. Uneven, with empty micro-batches on a rank.
SIZES = [
    [(2, 1), (0, 3), (1, 1), (3, 0)],
    [(1, 2), (2, 0), (0, 2), (1, 1)],
    [(2, 2), (1, 3), (3, 1), (0, 2)],
]


def data(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and the output gradient of ``rank`` at a micro-batch, on every process."""
    generator = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    shape = (SIZES[step][micro][rank], CHANNELS, *SPATIAL)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 5
    return x, torch.randn(shape, generator=generator, dtype=torch.float64)


def affine() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    weight = torch.rand(CHANNELS, generator=generator, dtype=torch.float64) + 0.5
    return weight, torch.randn(CHANNELS, generator=generator, dtype=torch.float64)


def _accumulate(rank: int, world_size: int) -> dict:
    layer = distnorm.SyncBatchNorm2d(CHANNELS, accumulation_steps=K).double()
    with torch.no_grad():
        layer.weight.copy_(affine()[0])
        layer.bias.copy_(affine()[1])
    results: dict = {"outputs": [], "grads": [], "running": [], "param_grads": [], "logs": []}
    for step in range(len(SIZES)):
        for micro in range(K):
            x, g = data(step, micro, rank)
            x.requires_grad_(True)
            with recorded_collectives() as forward:
                y = layer(x)
            with recorded_collectives() as backward:
                (y * g).sum().backward()
            results["outputs"].append(y.detach())
            results["grads"].append(x.grad)
            results["logs"].append(
                [[(c.name, c.numel) for c in log] for log in (forward, backward)]
            )
        stats = (layer.running_mean, layer.running_var, layer.num_batches_tracked)
        results["running"].append(tuple(t.clone() for t in stats))
        results["param_grads"].append((layer.weight.grad.clone(), layer.bias.grad.clone()))
        layer.zero_grad()
    return results


@pytest.fixture(scope="module")
def accumulated() -> list[dict]:
    return run_on_ranks(_accumulate, 2)


def _reference() -> tuple[list, list, list, list]:
    """Outputs and input gradients per micro-batch and rank; running statistics and the
    summed parameter gradients per step, in float64, from the defined forward and backward.

    Micro-batch t normalizes with the mean and biased variance of micro-batches t-K+1..t of
    both ranks. Its input gradient is BatchNorm's, ``gamma invstd (g - S_g / n - xhat
    S_gx / n)``, with the sums ``S_g = sum g`` and ``S_gx = sum g xhat`` taken over the same
    window: this micro-batch's, and each earlier one's as its own backward pass found them
    (MABN's averaged backward statistics, Yan et al. 2020)."""
    weight, bias = affine()
    channel = (1, -1, 1, 1)
    micro_batches = [[data(s, j, r) for r in range(2)] for s in range(len(SIZES)) for j in range(K)]
    running = nn.BatchNorm2d(CHANNELS).double()
    outputs, grads, stats, param_grads, sums = [], [], [], [], []
    weight_grad, bias_grad = torch.zeros(CHANNELS, dtype=torch.float64), 0.0
    for t, ranks in enumerate(micro_batches):
        window = [x for earlier in micro_batches[max(0, t - K + 1) : t + 1] for x, _ in earlier]
        values = torch.cat(window)
        count = values.numel() // CHANNELS
        mean = values.mean(dim=(0, 2, 3)).view(channel)
        invstd = torch.rsqrt(values.var(dim=(0, 2, 3), unbiased=False) + 1e-5).view(channel)
        normalized = [(x - mean) * invstd for x, _ in ranks]
        outputs.append([xhat * weight.view(channel) + bias.view(channel) for xhat in normalized])
        g_sum = sum(g.sum(dim=(0, 2, 3)) for _, g in ranks)
        gx_sum = sum(
            (g * xhat).sum(dim=(0, 2, 3)) for (_, g), xhat in zip(ranks, normalized, strict=True)
        )
        sums.append((g_sum, gx_sum))
        window_g = sum(a for a, _ in sums[max(0, t - K + 1) :]).view(channel) / count
        window_gx = sum(b for _, b in sums[max(0, t - K + 1) :]).view(channel) / count
        grads.append(
            [
                weight.view(channel) * invstd * (g - window_g - xhat * window_gx)
                for (_, g), xhat in zip(ranks, normalized, strict=True)
            ]
        )
        weight_grad, bias_grad = weight_grad + gx_sum, bias_grad + g_sum
        if t % K == K - 1:
            step = [x for earlier in micro_batches[t - K + 1 : t + 1] for x, _ in earlier]
            running(torch.cat(step))  # one nn.BatchNorm step on the concatenated batch
            stats.append((running.running_mean.clone(), running.running_var.clone()))
            param_grads.append((weight_grad, bias_grad))
            weight_grad, bias_grad = torch.zeros(CHANNELS, dtype=torch.float64), 0.0
    return outputs, grads, stats, param_grads


def test_micro_batch_k_equals_batchnorm_on_the_step_batch(accumulated: list[dict]) -> None:
    for step in range(len(SIZES)):
        batches = [data(step, j, r)[0] for j in range(K) for r in range(2)]
        expected = F.batch_norm(torch.cat(batches), None, None, *affine(), True, 0.0, 1e-5)
        last = torch.cat([accumulated[r]["outputs"][step * K + K - 1] for r in range(2)])
        rows = sum(SIZES[step][K - 1])
        torch.testing.assert_close(last, expected[len(expected) - rows :], rtol=0, atol=1e-12)


def test_outputs_and_gradients_are_those_of_the_defined_rule(accumulated: list[dict]) -> None:
    outputs, grads, _, param_grads = _reference()
    for t in range(len(outputs)):
        for rank in range(2):
            torch.testing.assert_close(accumulated[rank]["outputs"][t], outputs[t][rank])
            torch.testing.assert_close(accumulated[rank]["grads"][t], grads[t][rank])
    for step, (weight_grad, bias_grad) in enumerate(param_grads):  # DDP would sum the ranks'
        summed = [sum(accumulated[r]["param_grads"][step][i] for r in range(2)) for i in (0, 1)]
        torch.testing.assert_close(summed[0], weight_grad)
        torch.testing.assert_close(summed[1], bias_grad)


def test_running_statistics_move_once_per_step_as_batchnorms(accumulated: list[dict]) -> None:
    _, _, stats, _ = _reference()
    for rank in range(2):
        for step, (mean, var) in enumerate(stats):
            got_mean, got_var, tracked = accumulated[rank]["running"][step]
            torch.testing.assert_close(got_mean, mean, rtol=0, atol=1e-12)
            torch.testing.assert_close(got_var, var, rtol=0, atol=1e-12)
            assert int(tracked) == step + 1


def test_one_fixed_size_collective_each_way_per_micro_batch(accumulated: list[dict]) -> None:
    width = 2 * CHANNELS + 1 + comm.TAG_SIZE  # no world size, no k
    for rank in range(2):
        for forward, backward in accumulated[rank]["logs"][1:]:  # the first agrees the shift
            assert forward == [("all_reduce", width)]
            assert backward == [("all_reduce", width)]


def two_steps_of_batchnorm() -> nn.BatchNorm2d:
    """nn.BatchNorm2d after one call per step on each of the first two steps' batches."""
    reference = nn.BatchNorm2d(CHANNELS).double()
    for step in range(2):
        reference(torch.cat([data(step, j, r)[0] for j in range(K) for r in range(2)]))
    return reference


def _ddp_no_sync(rank: int, world_size: int) -> list[torch.Tensor]:
    """The layer under DDP, gradients accumulated with no_sync(), an SGD step per k."""
    layer = distnorm.SyncBatchNorm2d(CHANNELS, accumulation_steps=K).double()
    model = DistributedDataParallel(layer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        for micro in range(K):
            x, g = data(step, micro, rank)
            if micro < K - 1:
                with model.no_sync():
                    (model(x) * g).sum().backward()
            else:
                (model(x) * g).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return [layer.running_mean, layer.running_var, layer.num_batches_tracked]


def test_ddp_no_sync_steps_update_running_statistics_per_step() -> None:
    reference = two_steps_of_batchnorm()
    for mean, var, tracked in run_on_ranks(_ddp_no_sync, 2):
        torch.testing.assert_close(mean, reference.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(var, reference.running_var, rtol=0, atol=1e-12)
        assert int(tracked) == 2


def _deepspeed_steps(rank: int, world_size: int) -> list[torch.Tensor]:
    """DeepSpeed's engine with ``gradient_accumulation_steps: K``: ``engine.step()`` after
    every micro-batch, the optimizer stepped by the engine at each K-th."""
    import deepspeed  # noqa: PLC0415 - on the CPU accelerator, set by the parent

    # What the deepspeed launcher sets; the process group exists already (gloo).
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size))
    layer = distnorm.SyncBatchNorm2d(CHANNELS, accumulation_steps=K)  # fp32: DeepSpeed's
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": K,
        "zero_optimization": {"stage": 0},
    }
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=layer, optimizer=optimizer, config=config)
    for step in range(2):
        for micro in range(K):
            x, g = data(step, micro, rank)
            engine.backward((engine(x.float()) * g.float()).sum())
            engine.step()
    return [layer.running_mean, layer.running_var, layer.num_batches_tracked]


def test_deepspeed_gradient_accumulation_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    reference = two_steps_of_batchnorm()
    for mean, var, tracked in run_on_ranks(_deepspeed_steps, 2, timeout_s=300):
        torch.testing.assert_close(mean.double(), reference.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var.double(), reference.running_var, rtol=1e-5, atol=1e-6)
        assert int(tracked) == 2
