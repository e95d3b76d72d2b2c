"""Per-channel passes over an activation, done by torch's own BatchNorm kernels.

Every layer here that normalizes with statistics it computes itself (synchronized across
ranks, pooled over groups of channels, estimated) needs the same few passes over the data::

    moments     mean_c = 1/m sum x,   var_c = 1/m sum (x - mean_c)^2
    affine      y = (x - mu_c) * a_c + b_c
    backward    g * gamma_c * invstd_c,  sum g,  sum g * (x - mu_c) * invstd_c
    (CUDA)      the same, and the synchronized input gradient, by nn.SyncBatchNorm's kernels

torch's BatchNorm kernels make exactly these passes, vectorized, in any memory format, for
half-precision activations with fp32 vectors, once handed the vectors as "running
statistics", "weight" and "bias": the moments kernel with momentum 0, the inference kernel
with running variance 1 and eps 0 (``(x - mu) / sqrt(1 + 0) * a + b``), the eval-mode
backward kernel with the batch's mean and variance as running statistics. Elementwise torch
expressions would be several passes each, and much slower for bf16 activations mixed with
fp32 vectors. Vectors are dense (never a stride-0 expanded view, which the kernels misread)
and in the statistics' dtype: fp32 for half and fp32 activations, fp64 for fp64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 statistics for half-precision and fp32 inputs, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_stats(parameter: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``parameter`` in the statistics' dtype, for the kernels (which take fp32 vectors
    with half-precision activations); the tensor itself when it already is."""
    if parameter is None or parameter.dtype == dtype:
        return parameter
    return parameter.to(dtype)


def full_precision(tensor: Tensor) -> torch.autocast:
    """A context with autocast off for ``tensor``'s device: the statistics' matrix products
    and vector arithmetic must not be cast to half precision by a caller's autocast."""
    return torch.autocast(tensor.device.type, enabled=False)


def channel_moments(input: Tensor, scratch: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``input`` (N, C, *), in the statistics'
    dtype; zeros for an empty input. ``scratch`` (2, C), in that dtype, is the CPU kernel's
    running statistics (which set its output dtype), overwritten; made when not given."""
    if input.is_cuda and input.numel() > 0:
        return torch.batch_norm_update_stats(input, None, None, 0.0)
    if scratch is None:
        scratch = input.new_zeros((2, input.size(1)), dtype=stats_dtype(input.dtype))
    if input.numel() == 0:
        return scratch[0].zero_(), scratch[1].zero_()
    return torch.batch_norm_update_stats(input, scratch[0], scratch[1], 0.0)


def channel_affine(
    input: Tensor, centre: Tensor, scale: Tensor, offset: Tensor | None, ones: Tensor
) -> Tensor:
    """``(input - centre) * scale + offset`` per channel (no offset for None), in one pass,
    in the input's dtype and memory format; ``ones`` is a vector of ones of the same size."""
    if input.numel() == 0:  # no values, maybe no channels either (an empty cell view)
        return torch.empty_like(input)
    return F.batch_norm(input, centre, ones, scale, offset, False, 0.0, 0.0)


def normalize(
    input: Tensor, mean: Tensor, var: Tensor, invstd: Tensor, weight: Tensor | None,
    bias: Tensor | None, eps: float,
) -> Tensor:  # fmt: skip
    """``(input - mean) / sqrt(var + eps) * weight + bias`` per channel, in one pass: on
    CUDA, with per-channel statistics, nn.SyncBatchNorm's elementwise kernel (``invstd``
    given); else BatchNorm's inference kernel."""
    if input.is_cuda and input.numel() > 0 and invstd.numel() == mean.numel():
        return torch.batch_norm_elemt(input, weight, bias, mean, invstd, eps)
    if input.numel() == 0:
        return torch.empty_like(input)
    return F.batch_norm(input, mean, var, weight, bias, False, 0.0, eps)


def eval_backward(
    grad: Tensor, input: Tensor, mean: Tensor, var: Tensor, weight: Tensor, eps: float,
    needs_input: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``grad * weight * invstd`` (undefined unless ``needs_input``), ``sum(grad * xhat)``
    and ``sum(grad)`` per channel, ``xhat = (input - mean) * invstd``, ``invstd = (var +
    eps)^-1/2``, in one pass: BatchNorm's eval-mode backward kernel with the batch's
    statistics as running statistics. ``weight`` must be a tensor (ones for none): the
    CUDA kernel cannot return parameter gradients without one."""
    if input.numel() == 0:
        zeros = torch.zeros_like(mean)
        return torch.empty_like(grad), zeros, zeros.clone()
    empty = mean.new_empty(0)
    return torch.ops.aten.native_batch_norm_backward(
        grad, input, weight, mean, var, empty, empty, False, eps, [needs_input, True, True]
    )
