"""Batch-Channel Normalization: a batch part with estimated statistics, then a channel part.

Maths: Qiao, Wang, Liu, Shen & Yuille, "Micro-Batch Training with Batch-Channel
Normalization and Weight Standardization" (arXiv:1903.10520), Algorithm 1, "Micro-Batch
BCN", as the official code (``EstBN`` and ``BCNorm``) computes it. With estimates
``mu_hat, sigma_hat^2`` and moving rate r, in training the batch's statistics first move
the estimates (no gradient through them), about the *old* estimate::

    mu_hat += r (mean(X_c) - mu_hat),   sigma_hat^2 += r (mean((X_c - mu_hat)^2) - sigma_hat^2)
    Z_c = gamma_c (X_c - mu_hat_c) / sqrt(sigma_hat_c^2 + eps) + beta_c        (batch part)
    Y_ng = gamma'_g (Z_ng - mean(Z_ng)) / sqrt(var(Z_ng) + eps) + beta'_g       (GroupNorm)

In eval the estimates stay. ``estimated=False`` ("large-batch BCN"): the batch part is
:class:`SyncBatchNorm`'s. Estimates are ``running_mean``/``running_var`` (``group_weight``
and ``group_bias`` are added to BatchNorm's keys); r defaults to BatchNorm's momentum.

Guarantees: the estimates move with the statistics of the whole group's batch, from one
all-reduce of ``2C + 1`` values, identical on every rank, exact for uneven and empty
batches; a mismatched or non-finite batch leaves them as they were (SyncBatchNorm's
device-side checks). Micro-batch mode has no backward collective: the channel part is per
sample. fp32 statistics for half inputs; output in the input's dtype and memory format;
eval equals :meth:`BatchChannelNorm.to_torch` (BatchNorm then GroupNorm) bit for bit.

Cost, micro-batch training: that one all-reduce, and BatchNorm's passes rather than a
BatchNorm's and a GroupNorm's: the batch part is a per-channel affine with constant
statistics, so the GroupNorm statistics follow from each (sample, channel) cell's moments
and both parts are one affine per cell (:class:`_EstimatedBatchChannelNormFunction`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from distnorm import comm, health
from distnorm.errors import InputError, layer_label
from distnorm.layers import kernels
from distnorm.layers.group_norm import DEFAULT_NUM_GROUPS, check_num_groups, choose_num_groups
from distnorm.layers.sync_batchnorm import SyncBatchNorm, _SyncState

# The paper's r. Not stated in the official code (a buffer set to 0 there, changed by
# training scripts it does not include); BatchNorm's momentum, the role r plays.
DEFAULT_ESTIMATE_RATE = 0.1


class _Constants(NamedTuple):
    """The constant tensors of one batch shape's micro-batch BCN call, made once: group
    sums and means as matrix products over the C channels, and ones for the kernels."""

    average: Tensor  # (C, C): 1 / (C/G) where two channels share a group
    group_mean: Tensor  # (C, G): 1 / (C/G) where channel c is in group g
    negative_group_mean: Tensor  # (C, G): the same times -1/L (L: values per cell)
    membership: Tensor  # (C, G): 1 where channel c is in group g
    cell_ones: Tensor  # (N * C,)
    lengths: Tensor  # (1, N): L each, the cells' value counts for the estimates' sums
    eps: Tensor  # () the channel part's eps


def _constants(state: _SyncState, batch: int, length: int, groups: int, eps: float) -> _Constants:
    def make(like: Tensor) -> _Constants:
        membership = state.membership(groups)
        per_group = membership.size(0) // groups
        group_mean = membership / per_group
        return _Constants(
            average=group_mean @ membership.T,
            group_mean=group_mean,
            negative_group_mean=group_mean * (-1.0 / max(length, 1)),
            membership=membership,
            cell_ones=like.new_ones(batch * membership.size(0)),
            lengths=like.new_full((1, batch), float(length)),
            eps=like.new_tensor(eps),
        )

    return state.constant("bcn", (batch, length, groups, eps), make)


class _EstimatedBatchChannelNormFunction(torch.autograd.Function):
    """Micro-batch BCN in training, both parts in one pass each way.

    Works on the input viewed as ``(1, N*C, L)`` "cells" (one per sample and channel, ``L``
    values each), whose means ``m`` and variances ``v`` (N, C) the layer has computed. The
    batch part is a per-channel affine ``z = s x + t`` with constant statistics, so a cell's
    z has mean ``s m + t`` and variance ``s^2 v``: the channel part's group statistics
    follow from the cells', and the output is one per-cell affine of x. Backward needs the
    per-cell sums of ``g`` and ``g (x - m)`` (one pass) and the input gradient
    (:func:`kernels.scaled_grad_plus_affine`); the rest is arithmetic on (N, C) tensors,
    viewed as (N, G, C/G) where a value per group meets values per channel, and group sums
    as matrix products.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        cells: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        group_weight: Tensor | None,
        group_bias: Tensor | None,
        constants: _Constants,
        estimates: tuple[Tensor, Tensor],
        cell_moments: tuple[Tensor, Tensor],
        eps: float,
    ) -> Tensor:
        estimate_mean, estimate_var = estimates
        cell_mean, cell_var = cell_moments  # (N, C)
        dtype = cell_mean.dtype
        weight, bias, group_weight, group_bias = (
            kernels.as_stats(p, dtype) for p in (weight, bias, group_weight, group_bias)
        )
        batch, channels = cell_mean.shape
        groups = constants.group_mean.size(1)

        # Batch part: z = s x + t, s = gamma * rsqrt(sigma_hat^2 + eps), t = beta - mu_hat s.
        rstd = torch.rsqrt(estimate_var + eps)
        batch_scale = rstd if weight is None else rstd * weight
        batch_shift = (
            torch.mul(estimate_mean, batch_scale).neg_()
            if bias is None
            else torch.addcmul(bias, estimate_mean, batch_scale, value=-1)
        )
        # Channel part, GroupNorm of z per sample and group (Wu & He 2018, Eq. 1-3), from
        # the cells' moments of z: mean s m + t, variance s^2 v; rstd_g per (sample, group).
        z_mean = torch.addcmul(batch_shift, cell_mean, batch_scale)
        z_deviation = torch.addmm(z_mean, z_mean, constants.average, alpha=-1)
        spread = torch.addcmul(z_deviation.square(), cell_var, batch_scale.square())
        group_rstd = torch.addmm(constants.eps, spread, constants.group_mean).rsqrt_()
        gamma_rstd = group_rstd if group_weight is None else group_rstd * group_weight
        # y = gamma' (z - mean_g) rstd_g + beta' = (x - m) * scale + offset, per cell.
        per_group = gamma_rstd.unsqueeze(2)
        deviation = z_deviation.view(batch, groups, channels // groups)
        scale = per_group * batch_scale.view(groups, channels // groups)
        if group_bias is None:
            offset = per_group * deviation
        else:
            offset = torch.addcmul(group_bias.unsqueeze(1), per_group, deviation)
        centre = cell_mean.view(-1)
        output = kernels.channel_affine(
            cells, centre, scale.view(-1), offset.view(-1), constants.cell_ones
        )
        centred = None if weight is None else cell_mean - estimate_mean
        ctx.save_for_backward(cells, cell_mean, cell_var, rstd, batch_scale, z_deviation,
                              group_rstd, gamma_rstd, scale, centred)  # fmt: skip
        ctx.constants = constants
        ctx.affine = group_weight is not None
        return output

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_output: Tensor
    ) -> tuple[Tensor | None, ...]:
        (cells, cell_mean, cell_var, rstd, batch_scale, z_deviation, group_rstd, gamma_rstd,
         scale, centred) = ctx.saved_tensors  # fmt: skip
        constants: _Constants = ctx.constants
        health.MONITOR.at_backward()
        shape = cell_mean.shape
        length = cells.size(2)
        with kernels.full_precision(grad_output):
            # Per cell sum(g (x - m)) and sum(g), in one pass.
            centre, ones = cell_mean.view(-1), constants.cell_ones
            sum_grad_centred, sum_grad = (
                sums.view(shape)
                for sums in kernels.grad_sums(grad_output, cells, centre, ones, ones)
            )
            # Per cell sum(g zhat) / rstd_g, zhat the channel part's normalized z; per (sample,
            # group) their means over the group's values, times -1 (one matrix product).
            sum_grad_zhat = torch.addcmul(batch_scale * sum_grad_centred, z_deviation, sum_grad)
            mean_grad, mean_grad_zhat = (
                torch.stack((sum_grad, sum_grad_zhat)) @ constants.negative_group_mean
            ).unsqueeze(3)
            # GroupNorm's backward, dz = rstd_g (dzhat - mean_g(dzhat) - zhat mean_g(dzhat
            # zhat)), dzhat = gamma' g, means over a sample's group; dx = s dz per cell:
            #   dx = g * scale + (x - m) * slope + constant.
            correction = mean_grad_zhat * group_rstd.square().unsqueeze(2)
            deviation = z_deviation.view(scale.shape)
            centred_mean = torch.addcmul(mean_grad, deviation, correction)
            scaled_correction = batch_scale.view(scale.shape[1:]) * correction
            slope = scale * scaled_correction
            constant = scale * centred_mean
            grad_input = kernels.scaled_grad_plus_affine(
                grad_output, scale.view(-1), cells, centre, slope.view(-1),
                constant.view(-1), ones,
            )  # fmt: skip
            if not ctx.affine:
                return (grad_input, None, None, None, None, None, None, None, None)

            # Per cell sum(dz) and sum(dz (x - m)); then the batch part's affine gradients,
            # dz/dbeta = 1 and dz/dgamma = rstd (x - mu_hat); the channel part's, per group.
            per_group = gamma_rstd.unsqueeze(2)
            grouped = scale.shape
            sum_dz = per_group * torch.add(sum_grad.view(grouped), centred_mean, alpha=length)
            sum_dz_centred = per_group * torch.addcmul(
                sum_grad_centred.view(grouped), scaled_correction, cell_var.view(grouped),
                value=length,
            )  # fmt: skip
            sum_dz = sum_dz.view(shape)
            sum_dz_estimate = torch.addcmul(sum_dz_centred.view(shape), centred, sum_dz)
            grad_zhat = (group_rstd.unsqueeze(2) * sum_grad_zhat.view(grouped)).view(shape)
            sums = torch.stack((grad_zhat, sum_grad, sum_dz_estimate, sum_dz)).sum(dim=1)
            grad_group_weight, grad_group_bias = sums[:2] @ constants.membership
            grad_weight = sums[2] * rstd
        return (grad_input, grad_weight, sums[3], grad_group_weight, grad_group_bias,
                None, None, None, None)  # fmt: skip


class BatchChannelNorm(SyncBatchNorm):
    r"""Batch-Channel Normalization of inputs ``(N, C, *)``: a batch part with estimated
    (``estimated=True``) or synchronized batch (``estimated=False``) statistics and a
    per-channel affine, then group normalization of each sample over ``num_groups`` groups
    with a per-group affine. See the module docstring for the maths, guarantees and costs.

    ``num_groups`` is reduced to a divisor of C with at least two channels per group
    (:func:`~distnorm.layers.group_norm.choose_num_groups`: 32 for C=64, 24 for C=48).
    ``momentum`` is the large-batch mode's BatchNorm momentum; ``estimate_rate`` is the
    paper's r, the micro-batch mode's moving rate. ``process_group=None`` is the world.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int = DEFAULT_NUM_GROUPS,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        estimate_rate: float = DEFAULT_ESTIMATE_RATE,
        estimated: bool = True,
        affine: bool = True,
        process_group: comm.Group = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        check_sync: bool | None = None,
        nonfinite: str = "warn",
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats=True,
            process_group=process_group, device=device, dtype=dtype, check_sync=check_sync,
            nonfinite=nonfinite,
        )  # fmt: skip
        try:
            groups = choose_num_groups(num_features, num_groups)
        except InputError:
            raise InputError(
                f"{layer_label(self)} cannot split its {num_features} channels into the "
                f"groups of its channel part with num_groups={num_groups}: that needs a G "
                "that divides C, with 2 <= G <= num_groups and 2 or more channels per group; "
                "choose another num_groups, or keep (Sync)BatchNorm for this layer"
            ) from None
        self._init_channel_state(groups, estimate_rate, estimated)

    def _init_channel_state(
        self,
        num_groups: int,
        estimate_rate: float = DEFAULT_ESTIMATE_RATE,
        estimated: bool = True,
    ) -> None:
        """Attributes and parameters BCN holds besides SyncBatchNorm's; also called by
        :func:`distnorm.convert_model` on the BatchNorms it re-classes, whose running
        statistics thereby become the initial estimates. ``num_groups`` is used as given
        and must divide the channels. A BatchNorm without running statistics gets fresh
        estimates (mean 0, variance 1), since BCN cannot work without them."""
        check_num_groups(self.num_features, num_groups, layer=layer_label(self))
        if not 0.0 <= estimate_rate <= 1.0:
            raise InputError(
                f"{layer_label(self)}: estimate_rate={estimate_rate} is a moving rate and "
                "must lie in [0, 1] (the paper's r; BatchNorm's momentum 0.1 is the default)"
            )
        self.num_groups = num_groups
        self.estimate_rate = float(estimate_rate)
        self.estimated = bool(estimated)

        reference = next((t for t in (self.weight, self.running_mean) if t is not None), None)
        factory: dict[str, Any] = {}
        if reference is not None:
            factory = {"device": reference.device, "dtype": reference.dtype}
        if self.running_mean is None or self.running_var is None:
            self.register_buffer("running_mean", torch.zeros(self.num_features, **factory))
            self.register_buffer("running_var", torch.ones(self.num_features, **factory))
            device = factory.get("device")
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
            self.track_running_stats = True
        if self.affine:
            self.group_weight = nn.Parameter(torch.ones(num_groups, **factory))
            self.group_bias = nn.Parameter(torch.zeros(num_groups, **factory))
        else:
            self.register_parameter("group_weight", None)
            self.register_parameter("group_bias", None)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # Called by _NormBase.__init__ before the group parameters exist.
        if getattr(self, "group_weight", None) is not None:
            nn.init.ones_(self.group_weight)
            nn.init.zeros_(self.group_bias)

    def extra_repr(self) -> str:
        mode = f"estimated, estimate_rate={self.estimate_rate}" if self.estimated else "batch"
        return f"{super().extra_repr()}, num_groups={self.num_groups}, {mode}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if self.training and self.estimated:
            return self._estimated_training_forward(input)
        dtype = kernels.stats_dtype(input.dtype)
        if self.estimated:
            normalized = self._estimated_batch_norm(input, dtype)
        else:
            normalized = self._batch_norm(input, self.weight, self.bias).to(dtype)
        return self._channel_norm(normalized).to(input.dtype)

    def _estimated_training_forward(self, input: Tensor) -> Tensor:
        """Micro-batch training: the estimates updated from the whole group's batch, then
        both parts in one pass (:class:`_EstimatedBatchChannelNormFunction`). The input is
        viewed as one "cell" per sample and channel, copied to channel-major order first
        when it is not (channels_last), and the output returned in the input's layout."""
        with kernels.full_precision(input):
            return self._estimated_training_call(input)

    def _estimated_training_call(self, input: Tensor) -> Tensor:
        assert self.running_mean is not None and self.running_var is not None
        batch, channels = input.shape[:2]
        cells = input.contiguous().view(1, batch * channels, math.prod(input.shape[2:]))
        length = cells.size(2)
        state = self._sync_state(input, channels, self._sync_group(), shifted=False)
        constants = _constants(state, batch, length, self.num_groups, self.eps)
        cell_mean, cell_var = kernels.channel_moments(cells.detach(), state.scratch_for(cells))
        cell_mean, cell_var = cell_mean.view(batch, channels), cell_var.view(batch, channels)
        if not state.recomputing:  # a recomputed forward finds them updated already
            self._update_estimates(state, constants, cell_mean, cell_var)
        # The Function reads the estimates in forward and saves only what it derives: a
        # later call may update them in place before this call's backward.
        estimates = (self.running_mean.to(cell_mean.dtype), self.running_var.to(cell_mean.dtype))
        output = _EstimatedBatchChannelNormFunction.apply(
            cells,
            self.weight,
            self.bias,
            self.group_weight,
            self.group_bias,
            constants,
            estimates,
            (cell_mean, cell_var),
            self.eps,
        ).view(input.shape)
        if input.is_contiguous():
            return output
        return torch.empty_like(input).copy_(output)

    def _estimated_batch_norm(self, input: Tensor, dtype: torch.dtype) -> Tensor:
        """The micro-batch batch part in eval, in ``dtype``: torch's inference BatchNorm
        kernel with the estimates, as :meth:`to_torch` computes it."""
        values = input.to(dtype)
        # Copies: autograd keeps the statistics for backward, and a training call may update
        # the buffers in place before it runs.
        mean = self.running_mean.to(dtype, copy=True)
        var = self.running_var.to(dtype, copy=True)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.batch_norm(values, mean, var, weight, bias, False, 0.0, self.eps)

    @torch.no_grad()
    def _update_estimates(
        self, state: _SyncState, constants: _Constants, cell_mean: Tensor, cell_var: Tensor
    ) -> None:
        """``mu_hat += r (mu - mu_hat)``, ``sigma_hat^2 += r (s^2 - sigma_hat^2)`` with the
        statistics of the whole group's batch, from one all-reduce of 2C + 1 values, and the
        batch counted. The local sums about the old estimate come from each cell's (sample
        and channel's) mean and variance: ``sum(x - mu_hat) = L (m - mu_hat)``,
        ``sum((x - mu_hat)^2) = L (v + (m - mu_hat)^2)``, summed over the samples. A batch
        that is mismatched or not finite (a NaN or Inf on any rank, hence on every rank
        alike) changes nothing; one empty on every rank counts and changes nothing."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        batch, channels = cell_mean.shape
        channel = state.channel
        centred = torch.empty((2, batch, channels), dtype=cell_mean.dtype, device=cell_mean.device)
        torch.sub(cell_mean, self.running_mean, out=centred[0])
        torch.addcmul(cell_var, centred[0], centred[0], out=centred[1])
        buffer = channel.new_buffer()
        torch.matmul(constants.lengths, centred, out=buffer[: 2 * channels].view(2, 1, channels))
        summed = channel.all_reduce(buffer, "forward")
        steps = summed[:-1].view(2, channels) / summed[-1]  # mu - mu_hat, s^2
        steps[1].sub_(self.running_var)  # s^2 - sigma_hat^2
        nonfinite, mismatch = channel.flag("nonfinite"), channel.flag("forward")
        nonfinite.addmv_(state.zeros, summed[:-1])
        ok = torch.eq(mismatch, nonfinite).view(())
        self.num_batches_tracked.add_(ok)
        if cell_mean.numel() == 0:  # maybe empty on every rank: then the steps are 0 / 0
            ok = ok & summed[-1].gt(0)
        steps = torch.where(ok, steps, state.zero)
        torch._foreach_add_(
            [self.running_mean, self.running_var], [steps[0], steps[1]], alpha=self.estimate_rate
        )

    def _channel_norm(self, input: Tensor) -> Tensor:
        """GroupNorm of each sample over ``num_groups`` groups, with the per-group affine
        spread over each group's channels for torch's kernel."""
        per_group = input.size(1) // self.num_groups
        weight = bias = None
        if self.group_weight is not None and self.group_bias is not None:
            weight = self.group_weight.to(input.dtype).repeat_interleave(per_group)
            bias = self.group_bias.to(input.dtype).repeat_interleave(per_group)
        return F.group_norm(input, self.num_groups, weight, bias, self.eps)

    def to_torch(self, origin: type[_BatchNorm] = nn.BatchNorm2d) -> nn.Sequential:
        """``Sequential(origin BatchNorm, GroupNorm)`` computing this layer's eval-mode
        output, for export: the BatchNorm shares this layer's weight, bias and buffers (the
        estimates are its running statistics); the GroupNorm holds the per-group affine
        spread over the channels, copied."""
        reference = self.running_mean
        assert reference is not None and self.running_var is not None
        batch = origin(
            self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine,
            track_running_stats=True, device=reference.device, dtype=reference.dtype,
        )  # fmt: skip
        if self.affine:
            batch.weight, batch.bias = self.weight, self.bias
        batch.running_mean, batch.running_var = self.running_mean, self.running_var
        batch.num_batches_tracked = self.num_batches_tracked

        group_reference = self.group_weight if self.group_weight is not None else reference
        channel = nn.GroupNorm(
            self.num_groups, self.num_features, eps=self.eps, affine=self.affine,
            device=group_reference.device, dtype=group_reference.dtype,
        )  # fmt: skip
        if self.group_weight is not None and self.group_bias is not None:
            per_group = self.num_features // self.num_groups
            with torch.no_grad():
                channel.weight.copy_(self.group_weight.repeat_interleave(per_group))
                channel.bias.copy_(self.group_bias.repeat_interleave(per_group))
        return nn.Sequential(batch, channel).train(self.training)
