"""The per-channel passes of distnorm.layers.kernels against their formulas in float64.

Every synchronized layer's forward and backward is built from these passes, handed to
torch's BatchNorm kernels as "running statistics", "weight" and "bias"; a kernel that
reads a vector differently than the formula says (a memory format, a half-precision
input, an empty batch, a 2-D input) would be wrong in every layer at once. (On CUDA,
``normalize`` takes nn.SyncBatchNorm's kernel instead: tests/test_sync_batchnorm_cuda.py.)
"""

from __future__ import annotations

import pytest
import torch

from distnorm.layers import kernels

SHAPES = {
    "2d": (5, 6),
    "3d": (5, 6, 7),
    "4d": (3, 6, 4, 5),
    "4d_channels_last": (3, 6, 4, 5),
    "5d": (2, 6, 3, 2, 4),
}
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}


def activation(shape_id: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPES[shape_id], generator=generator, dtype=torch.float64) * 2 + 1
    x = x.to(dtype)
    if shape_id.endswith("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def vector(seed: int, channels: int = 6) -> torch.Tensor:
    return torch.randn(channels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view([1, -1] + [1] * (like.dim() - 2))


def reduced(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape_id", SHAPES)
def test_each_pass_is_its_formula(shape_id: str, dtype: torch.dtype) -> None:
    x, g = activation(shape_id, dtype), activation(shape_id, dtype, seed=1)
    stats = kernels.stats_dtype(dtype)
    centre, scale, offset, slope = (vector(s).to(stats) for s in range(4))
    x64, g64 = x.double(), g.double()
    tolerance = TOLERANCE[dtype]

    mean, var = kernels.channel_moments(x)
    assert mean.dtype == var.dtype == stats  # fp32 statistics for a bf16 input
    torch.testing.assert_close(mean.double(), x64.mean(reduced(x)), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        var.double(), x64.var(reduced(x), unbiased=False), rtol=1e-5, atol=1e-6
    )

    def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
        assert actual.dtype == dtype and actual.shape == x.shape
        scale_of_values = expected.abs().max().item()
        torch.testing.assert_close(
            actual.double(), expected, rtol=0, atol=tolerance * max(scale_of_values, 1.0)
        )

    c, a, b = (per_channel(v.double(), x) for v in (centre, scale, offset))
    ones = torch.ones(6, dtype=stats)
    affine = kernels.channel_affine(x, centre, scale, offset, ones)
    close(affine, (x64 - c) * a + b)
    assert affine.is_contiguous(memory_format=torch.channels_last) == shape_id.endswith("last")

    var, eps = scale.abs() + 0.5, 1e-3
    invstd = (var.double() + eps).rsqrt()
    normalized = kernels.normalize(x, centre, var, invstd.to(stats), scale, offset, eps)
    close(normalized, (x64 - c) * per_channel(invstd, x) * a + b)

    sum_grad_xhat, sum_grad = kernels.grad_sums(g, x, centre, invstd.to(stats), ones)
    xhat = (x64 - c) * per_channel(invstd, x)
    assert sum_grad.dtype == sum_grad_xhat.dtype == stats
    torch.testing.assert_close(sum_grad.double(), g64.sum(reduced(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        sum_grad_xhat.double(), (g64 * xhat).sum(reduced(x)), rtol=1e-5, atol=1e-4
    )

    slope = vector(4).to(stats)
    combined = kernels.scaled_grad_plus_affine(g, scale, x, centre, slope, offset, ones)
    close(combined, g64 * a + (x64 - c) * per_channel(slope.double(), x) + b)


def test_empty_batches_give_zero_sums_and_empty_outputs() -> None:
    x = torch.zeros(0, 6, 3, 3)
    centre = torch.zeros(6)
    ones = torch.ones(6)
    mean, var = kernels.channel_moments(x)
    assert torch.equal(mean, centre) and torch.equal(var, centre)
    assert kernels.channel_affine(x, centre, ones, centre, ones).shape == x.shape
    assert kernels.normalize(x, centre, ones, ones, ones, centre, 1e-5).shape == x.shape
    sum_grad_xhat, sum_grad = kernels.grad_sums(x, x, centre, ones, ones)
    assert torch.equal(sum_grad, centre) and torch.equal(sum_grad_xhat, centre)
    assert kernels.scaled_grad_plus_affine(x, ones, x, centre, ones, centre, ones).shape == x.shape
    cells = torch.zeros(1, 0, 4)  # a batch of 0 samples viewed as cells: no channels at all
    assert kernels.channel_affine(cells, centre[:0], centre[:0], centre[:0], ones[:0]).numel() == 0


def test_statistics_dtype() -> None:
    assert kernels.stats_dtype(torch.bfloat16) == torch.float32
    assert kernels.stats_dtype(torch.float16) == torch.float32
    assert kernels.stats_dtype(torch.float32) == torch.float32
    assert kernels.stats_dtype(torch.float64) == torch.float64
