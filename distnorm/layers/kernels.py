"""Per-channel passes over an activation, done by torch's own BatchNorm kernels.

Every layer here that normalizes with statistics it computes itself (synchronized across
ranks, pooled over groups of channels, estimated) needs the same few passes over the data::

    moments     mean_c = 1/m sum x,   var_c = 1/m sum (x - mean_c)^2
    affine      y = (x - mu_c) * a_c + b_c
    grad sums   sum g,  sum g * (x - mu_c) * invstd_c
    grad input  dx = g * a_c + (x - mu_c) * p_c + q_c
    (CUDA)      per channel, the affine and the input gradient by nn.SyncBatchNorm's kernels

torch's BatchNorm kernels make exactly these passes, vectorized, in any memory format, for
half-precision activations with fp32 vectors, once handed the vectors as "running
statistics", "weight" and "bias": the moments kernel with momentum 0, the inference kernel
with running variance 1 and eps 0 (``(x - mu) / sqrt(1 + 0) * a + b``), the training
backward kernel with ``mu`` and ``invstd`` as the saved statistics. Elementwise torch
expressions would be several passes each, and much slower for bf16 activations mixed with
fp32 vectors. Vectors are dense (never a stride-0 expanded view, which the kernels misread)
and in the statistics' dtype: fp32 for half and fp32 activations, fp64 for fp64.
"""

from __future__ import annotations

import contextlib
from typing import Any

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


def affine_for(
    weight: Tensor | None, bias: Tensor | None, statistics: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """``weight`` and ``bias`` in the dtype of the running ``statistics`` they are used
    with, as torch's BatchNorm kernels require: FSDP2's mixed precision casts parameters
    to half precision and leaves buffers in fp32."""
    if statistics is None:
        return weight, bias
    return as_stats(weight, statistics.dtype), as_stats(bias, statistics.dtype)


def full_precision(tensor: Tensor) -> contextlib.AbstractContextManager[Any]:
    """A context with autocast off for ``tensor``'s device, when it is on: the statistics'
    matrix products and vector arithmetic must not be cast to half precision by a
    caller's autocast."""
    device = tensor.device.type
    if torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


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
    if input.size(1) == 0:  # no channels (BatchChannelNorm's cells of an empty batch)
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
    return F.batch_norm(input, mean, var, weight, bias, False, 0.0, eps)


def grad_sums(
    grad: Tensor, input: Tensor, centre: Tensor, invstd: Tensor, ones: Tensor
) -> tuple[Tensor, Tensor]:
    """Per channel ``sum(grad * (input - centre) * invstd)`` and ``sum(grad)``, in one pass:
    the training backward kernel asked only for its weight and bias gradients, with
    ``centre`` and ``invstd`` as the saved statistics. ``ones`` (a weight tensor) because
    the CUDA kernel cannot return those gradients without one."""
    if input.numel() == 0:
        zeros = torch.zeros_like(centre)
        return zeros, zeros.clone()
    _, sum_scaled, sum_grad = torch.ops.aten.native_batch_norm_backward(
        grad, input, ones, None, None, centre, invstd, True, 0.0, [False, True, True]
    )
    return sum_scaled, sum_grad


def scaled_grad_plus_affine(
    grad: Tensor, grad_scale: Tensor, input: Tensor, centre: Tensor, slope: Tensor,
    constant: Tensor, ones: Tensor,
) -> Tensor:  # fmt: skip
    """``grad * grad_scale + (input - centre) * slope + constant`` per channel, in the
    input's dtype: the input gradient of every layer here. Two passes for fp32/fp64 (the
    affine, then a fused multiply-add in place); for half precision the affine kernel on
    ``grad`` too and an add (an elementwise product of a half tensor and an fp32 vector
    would be a slow mixed-dtype loop on CPU)."""
    result = channel_affine(input, centre, slope, constant, ones)
    if result.dtype == grad_scale.dtype:
        return result.addcmul_(grad, grad_scale.view([1, -1] + [1] * (grad.dim() - 2)))
    return result.add_(channel_affine(grad, torch.zeros_like(centre), grad_scale, None, ones))
