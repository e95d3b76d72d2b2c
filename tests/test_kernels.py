"""The per-channel passes of distnorm.layers.kernels against their formulas in float64.

Every synchronized layer's forward and backward is built from these four passes, handed to
torch's BatchNorm kernels as "running statistics", "weight" and "bias"; a kernel that
reads a vector differently than the formula says (a memory format, a half-precision
input, an empty batch, a 2-D input) would be wrong in every layer at once.
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

    c, a, b, p = (per_channel(v.double(), x) for v in (centre, scale, offset, slope))
    affine = kernels.channel_affine(x, centre, scale, offset)
    close(affine, (x64 - c) * a + b)
    if shape_id.endswith("channels_last"):
        assert affine.is_contiguous(memory_format=torch.channels_last)

    sum_grad, sum_grad_centred = kernels.centred_grad_sums(g, x, centre)
    torch.testing.assert_close(sum_grad.double(), g64.sum(reduced(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        sum_grad_centred.double(), (g64 * (x64 - c)).sum(reduced(x)), rtol=1e-5, atol=1e-4
    )

    combined = kernels.scaled_grad_plus_affine(g, scale, x, centre, slope, offset)
    close(combined, g64 * a + (x64 - c) * p + b)


def test_empty_batch_gives_zero_statistics_and_empty_outputs() -> None:
    x = torch.zeros(0, 6, 4, 4)
    centre = torch.randn(6)
    mean, var = kernels.channel_moments(x)
    assert torch.equal(mean, torch.zeros(6)) and torch.equal(var, torch.zeros(6))
    assert kernels.channel_affine(x, centre, centre, centre).shape == x.shape
    sums = kernels.centred_grad_sums(x, x, centre)
    assert all(torch.equal(s, torch.zeros(6)) for s in sums)
    assert kernels.scaled_grad_plus_affine(x, centre, x, centre, centre, centre).shape == x.shape
    # A view with no channels at all (BatchChannelNorm's cells of an empty batch).
    cells = torch.zeros(1, 0, 16)
    assert (
        kernels.channel_affine(cells, torch.zeros(0), torch.zeros(0), torch.zeros(0)).numel() == 0
    )
