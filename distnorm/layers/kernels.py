"""Per-channel passes over an activation, done by torch's own BatchNorm kernels.

Every layer here that normalizes with statistics it computes itself (synchronized across
ranks, pooled over groups of channels, estimated) needs the same few passes over the data::

    moments     mean_c = 1/m sum x,   var_c = 1/m sum (x - mean_c)^2        (one read)
    affine      y = (x - mu_c) * a_c + b_c                                (read, write)
    grad sums   sum g,  sum g * (x - mu_c)                                (two reads)
    grad input  dx = g * a_c + (x - mu_c) * p_c + q_c                     (two reads, write)

with small per-channel vectors (``mu, a, b, p, q``) that the layer computes from statistics
it has gathered or combined. Written as elementwise torch expressions, each is several
passes, and one mixing a bf16 activation with fp32 vectors is an order of magnitude slower
than the fused kernel on CPU (measured: a bf16 ``addcmul_`` with an fp32 per-channel factor,
9.5 ms for (8, 64, 56, 56), against 0.24 ms for the same values through the BatchNorm
inference kernel). torch's BatchNorm kernels do exactly these passes, vectorized, in any
memory format, and for fp16/bf16 activations with fp32 per-channel vectors (accumulating in
fp32), once they are handed the vectors as "running statistics", "weight" and "bias":

* moments: ``batch_norm_update_stats``, with scratch running statistics in the statistics'
  dtype (which is what makes a half-precision input return fp32 moments), momentum 0;
* affine: the inference kernel with ``running_mean = mu``, ``running_var = 1``, ``eps = 0``,
  ``weight = a``, ``bias = b``, which computes ``(x - mu) / sqrt(1 + 0) * a + b`` exactly;
* grad sums: the training backward kernel with ``save_mean = mu``, ``save_invstd = 1``,
  asked only for its weight and bias gradients, ``sum g * (x - mu)`` and ``sum g``;
* grad input: the affine kernel on ``x``, plus ``g * a`` (a fused multiply-add in fp32/fp64;
  for half precision the affine kernel again on ``g``, then an add, so the input gradient is
  rounded to the input dtype twice where torch's own BatchNorm rounds it once).

Every function takes the activation as ``(N, K, *)`` and dense (contiguous; never a stride-0
expanded view, which the kernels misread) per-channel vectors of K values in
the statistics' dtype (fp32 for half-precision and fp32 activations, fp64 for fp64); the
channels may be real channels or any other view's dimension 1. Empty activations (N = 0)
give zero sums and moments and empty outputs, where torch's CPU kernels would refuse them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 statistics for half-precision and fp32 inputs, fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def channel_shape(input: Tensor) -> list[int]:
    """Shape that broadcasts a per-channel vector against ``input`` of shape (N, C, *)."""
    return [1, input.size(1)] + [1] * (input.dim() - 2)


def channel_moments(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``input``, in the statistics' dtype."""
    dtype = stats_dtype(input.dtype)
    scratch = input.new_zeros((2, input.size(1)), dtype=dtype)
    if input.numel() == 0:
        return scratch[0], scratch[1]
    return torch.batch_norm_update_stats(input, scratch[0], scratch[1], 0.0)


def channel_affine(input: Tensor, centre: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """``(input - centre) * scale + offset`` per channel, in one pass, in the input's dtype
    and memory format."""
    if input.numel() == 0:  # no values, maybe no channels either (an empty cell view)
        return torch.empty_like(input)
    return F.batch_norm(input, centre, torch.ones_like(centre), scale, offset, False, 0.0, 0.0)


def centred_grad_sums(grad: Tensor, input: Tensor, centre: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(grad)`` and ``sum(grad * (input - centre))``, in one pass, in the
    statistics' dtype."""
    if input.numel() == 0:
        zeros = torch.zeros_like(centre)
        return zeros, zeros.clone()
    _, sum_grad_centred, sum_grad = torch.ops.aten.native_batch_norm_backward(
        grad, input, None, None, None, centre, torch.ones_like(centre), True, 0.0,
        [False, True, True],
    )  # fmt: skip
    return sum_grad, sum_grad_centred


def scaled_grad_plus_affine(
    grad: Tensor, grad_scale: Tensor, input: Tensor, centre: Tensor, slope: Tensor,
    constant: Tensor,
) -> Tensor:  # fmt: skip
    """``grad * grad_scale + (input - centre) * slope + constant`` per channel, in the
    input's dtype: the input gradient of every layer here."""
    result = channel_affine(input, centre, slope, constant)
    if result.dtype == grad_scale.dtype:  # fp32/fp64: one fused multiply-add
        return result.addcmul_(grad, grad_scale.view(channel_shape(grad)))
    zeros = torch.zeros_like(centre)
    return result.add_(channel_affine(grad, zeros, grad_scale, zeros))
