"""Batch-Channel Normalization: a batch part with estimated statistics, then a channel part.

Maths: Qiao, Wang, Liu, Shen & Yuille, "Micro-Batch Training with Batch-Channel
Normalization and Weight Standardization" (arXiv:1903.10520; BCN first appeared in their
arXiv:1911.09738), Algorithm 1, "Micro-Batch BCN", as the official code
(github.com/joe-siyuan-qiao/Batch-Channel-Normalization, ``EstBN`` and ``BCNorm`` in its
README) computes it. For an input X of shape (N, C, *) with m = N * prod(*) values per
channel c, estimates mu_hat, sigma_hat^2 (C each) and a moving rate r::

    batch part, training: update the estimates (no gradient flows through them)
        mu_c       = 1/m * sum X[:, c]                          the batch's mean
        s_c^2      = 1/m * sum (X[:, c] - mu_hat_c)^2           about the OLD estimate
        mu_hat_c      <- mu_hat_c      + r * (mu_c   - mu_hat_c)
        sigma_hat_c^2 <- sigma_hat_c^2 + r * (s_c^2  - sigma_hat_c^2)
    batch part, train and eval: normalize with the (just updated) estimates
        Z[:, c] = gamma_c * (X[:, c] - mu_hat_c) / sqrt(sigma_hat_c^2 + eps) + beta_c
    channel part: group normalization of each sample over G groups of C/G channels
        (Wu & He 2018, Eq. 1-3), with one affine pair per GROUP (G weights, G biases)
        Y[n, g] = gamma'_g * (Z[n, g] - mean(Z[n, g])) / sqrt(var(Z[n, g]) + eps) + beta'_g

The order is the paper's and the official code's: the batch's statistics move the estimates
first, and the batch is normalized with the updated ones. In eval mode the estimates stay
as they are and the maths is otherwise the same. With ``estimated=False`` ("large-batch
BCN", the official ImageNet and DeepLab code) the batch part is ordinary BatchNorm: here
:class:`~distnorm.layers.SyncBatchNorm`'s core, so it spans the process group.

The estimates are the ``running_mean``/``running_var`` buffers, so a BatchNorm checkpoint's
keys are a subset of this layer's (``group_weight`` and ``group_bias`` are the additions),
and a BatchNorm converted to BCN starts from its running statistics. Both eps are ``eps``
(the official code hard-codes 1e-5 in the batch part, the default here). The official code
keeps r in a buffer (``estbn_moving_speed``) initialized to 0 that nothing in the
repository sets; the default r = 0.1 here is BatchNorm's momentum, the role r plays.

What it guarantees:

* Distributed micro-batch training updates the estimates from the statistics of the whole
  process group's batch: every rank sends ``[sum(X - mu_hat), sum((X - mu_hat)^2), m]``
  (``2C + 1`` values, whatever the world size) in ONE all-reduce, so the update equals
  the single-process update on the concatenated batch, for uneven and empty per-rank
  batches, and every rank holds bit-identical estimates (all apply the same arithmetic to
  the same summed values). A batch that is empty on every rank leaves the estimates as
  they are, without a host synchronization. Sums about the old estimate rather than of
  X itself are the "shifted data" formula (Chan, Golub & LeVeque 1983): mu_c - mu_hat_c
  comes out directly and no large mean cancels in fp32.
* A batch whose sums are not finite (a NaN or Inf on any rank) leaves the estimates as
  they are and is not counted, on every rank alike, with or without peers; it is
  reported as ``nonfinite`` says (SyncBatchNorm's: warn once per process, raise, or skip
  silently; reporting reads one flag on the host). The collective carries SyncBatchNorm's
  mismatch check (``check_sync``).
* No backward collective in micro-batch mode: the estimates carry no gradient and the
  channel part normalizes each sample by itself, so a rank's output depends only on its
  own samples and the parameters; the input gradient is local and the parameter
  gradients are this rank's share, which DDP (or the user) sums like any other.
* Large-batch mode inherits SyncBatchNorm's guarantees for the batch part.
* Statistics in fp32 for half-precision inputs (fp64 for fp64 inputs), including the
  communication and the whole micro-batch path; output in the input's dtype and memory
  format (``channels_last`` is preserved); in micro-batch training a half-precision input's
  gradient is rounded to its dtype twice (SyncBatchNorm's note). In large-batch mode the
  batch part's output is the input's dtype, as SyncBatchNorm returns it, before the channel
  part.
* Eval mode computes exactly what :meth:`BatchChannelNorm.to_torch` (torch's BatchNorm
  followed by torch's GroupNorm) computes, bit for bit for inputs of the layer's dtype:
  the same kernels on the same values.

What it costs: in micro-batch training, one all-reduce of ``2C + 1`` values per step (none
for a group of one rank or in eval mode; 9 more with the mismatch check), and the passes of a
single BatchNorm, not of a BatchNorm and a GroupNorm: the batch part is a per-channel affine
with constant statistics, so the channel part's per-sample group statistics follow from each
(sample, channel) cell's mean and variance, and both parts together are one affine per cell
(:class:`_EstimatedBatchChannelNormFunction`): forward, one moments pass (which also feeds
the estimates' update) and one affine pass; backward, one pass for the cells' gradient sums
and one for the input gradient. Each pass is a torch BatchNorm kernel run on the input
viewed as ``(1, N*C, *)``; a channels_last input is copied to that order and the output
back. Eval mode and large-batch mode run torch's BatchNorm and GroupNorm kernels one after
the other (large-batch: SyncBatchNorm's core and its collectives, then the GroupNorm).
The layer-overhead benchmark has the measured figures.
"""

from __future__ import annotations

import math
from typing import Any

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


class _EstimatedBatchChannelNormFunction(torch.autograd.Function):
    """Micro-batch BCN in training, both parts in one pass each way.

    Works on the input viewed as ``(1, N*C, L)`` "cells" (one per sample and channel, ``L``
    values each), whose means ``m`` and variances ``v`` (N, C) the layer has computed. The
    batch part is a per-channel affine ``z = s x + t`` with constant statistics, so a cell's
    z has mean ``s m + t`` and variance ``s^2 v``: the channel part's group statistics
    follow from the cells', and the output is one per-cell affine of x. Backward needs the
    per-cell sums of ``g`` and ``g (x - m)`` (one pass, which also gives ``g * scale``) and
    one affine pass; the rest is arithmetic on (N, C) tensors, viewed as (N, G, C/G) where
    a value per group meets values per channel, and group sums as matrix products.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        cells: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        group_weight: Tensor | None,
        group_bias: Tensor | None,
        state: _SyncState,
        estimates: tuple[Tensor, Tensor],
        cell_moments: tuple[Tensor, Tensor],
        groups: int,
        eps: float,
    ) -> Tensor:
        estimate_mean, estimate_var = estimates
        cell_mean, cell_var = cell_moments  # (N, C)
        weight, bias, group_weight, group_bias = (
            kernels.as_stats(p, cell_mean.dtype) for p in (weight, bias, group_weight, group_bias)
        )
        batch, channels = cell_mean.shape
        grouped = (batch, groups, channels // groups)

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
        z_deviation = torch.addmm(z_mean, z_mean, _group_average(state, groups), alpha=-1)
        spread = torch.addcmul(z_deviation.square(), cell_var, batch_scale.square())
        eps_tensor = state.constant("eps", eps, lambda like: like.new_tensor(eps))
        group_rstd = torch.addmm(eps_tensor, spread, _group_mean(state, groups)).rsqrt_()
        gamma_rstd = group_rstd if group_weight is None else group_rstd * group_weight
        # y = gamma' (z - mean_g) rstd_g + beta' = (x - m) * scale + offset, per cell.
        per_group = gamma_rstd.view(batch, groups, 1)
        scale = (per_group * batch_scale.view(grouped[1:])).view(batch, channels)
        deviation = z_deviation.view(grouped)
        if group_bias is None:
            offset = per_group * deviation
        else:
            offset = torch.addcmul(group_bias.view(groups, 1), per_group, deviation)
        output = kernels.channel_affine(
            cells, cell_mean.view(-1), scale.view(-1), offset.view(-1),
            _cell_ones(state, cell_mean.numel()),
        )  # fmt: skip
        centred = None if weight is None else cell_mean - estimate_mean
        ctx.save_for_backward(cells, cell_mean, cell_var, rstd, batch_scale, z_deviation,
                              group_rstd, gamma_rstd, scale, centred)  # fmt: skip
        ctx.state, ctx.groups = state, groups
        ctx.affine = group_weight is not None
        return output

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_output: Tensor
    ) -> tuple[Tensor | None, ...]:
        with kernels.full_precision(grad_output):
            return _EstimatedBatchChannelNormFunction._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (cells, cell_mean, cell_var, rstd, batch_scale, z_deviation, group_rstd, gamma_rstd,
         scale, centred) = ctx.saved_tensors  # fmt: skip
        state: _SyncState = ctx.state
        health.MONITOR.at_backward()
        batch, channels = cell_mean.shape
        groups, length = ctx.groups, cells.size(2)
        grouped = (batch, groups, channels // groups)
        ones = _cell_ones(state, cell_mean.numel())
        # g * scale, and per cell sum(g (x - m)) and sum(g), in one pass.
        grad_input, sum_grad_centred, sum_grad = kernels.eval_backward(
            grad_output, cells, cell_mean.view(-1), ones, scale.view(-1), 0.0
        )
        sum_grad_centred, sum_grad = (
            sum_grad_centred.view(cell_mean.shape),
            sum_grad.view(cell_mean.shape),
        )
        # Per cell sum(g zhat) / rstd_g, zhat the channel part's normalized z; per (sample,
        # group) their means over the group's values, times -1 (one matrix product).
        sum_grad_zhat = torch.addcmul(batch_scale * sum_grad_centred, z_deviation, sum_grad)
        mean_grad, mean_grad_zhat = torch.stack((sum_grad, sum_grad_zhat)) @ _group_mean(
            state, groups, -1.0 / length
        )
        # GroupNorm's backward, dz = rstd_g (dzhat - mean_g(dzhat) - zhat mean_g(dzhat zhat)),
        # dzhat = gamma' g, means over a sample's group; dx = s dz per cell:
        #   dx = g * scale + (x - m) * slope + constant.
        correction = (mean_grad_zhat * group_rstd.square()).view(batch, groups, 1)
        centred_mean = torch.addcmul(
            mean_grad.view(batch, groups, 1), z_deviation.view(grouped), correction
        )
        scaled_correction = batch_scale.view(grouped[1:]) * correction
        slope = scale.view(grouped) * scaled_correction
        constant = scale.view(grouped) * centred_mean
        grad_input.add_(kernels.channel_affine(
            cells, cell_mean.view(-1), slope.view(-1), constant.view(-1), ones
        ))  # fmt: skip
        if not ctx.affine:
            return (grad_input, None, None, None, None, None, None, None, None, None)

        # Per cell sum(dz) and sum(dz (x - m)); then the batch part's affine gradients,
        # dz/dbeta = 1 and dz/dgamma = rstd (x - mu_hat); the channel part's, per group.
        per_group = gamma_rstd.view(batch, groups, 1)
        sum_dz = per_group * torch.add(sum_grad.view(grouped), centred_mean, alpha=length)
        sum_dz_centred = per_group * torch.addcmul(
            sum_grad_centred.view(grouped), scaled_correction, cell_var.view(grouped),
            value=length,
        )  # fmt: skip
        sum_dz = sum_dz.view(batch, channels)
        sum_dz_estimate = torch.addcmul(sum_dz_centred.view(batch, channels), centred, sum_dz)
        grad_zhat = (group_rstd.view(batch, groups, 1) * sum_grad_zhat.view(grouped)).view(
            batch, channels
        )
        sums = torch.stack((grad_zhat, sum_grad, sum_dz_estimate, sum_dz)).sum(dim=1)
        grad_group_weight, grad_group_bias = sums[:2] @ state.membership(groups)
        grad_weight = sums[2] * rstd
        return (grad_input, grad_weight, sums[3], grad_group_weight, grad_group_bias,
                None, None, None, None, None)  # fmt: skip


def _group_average(state: _SyncState, groups: int) -> Tensor:
    """(C, C): 1 / (C/G) where two channels are in the same group, else 0."""
    channels = state.ones.numel()

    def make(like: Tensor) -> Tensor:
        member = state.membership(groups)
        return member @ member.T / (channels // groups)

    return state.constant("group_average", groups, make)


def _group_mean(state: _SyncState, groups: int, scale: float = 1.0) -> Tensor:
    """(C, G): ``scale / (C/G)`` where channel c is in group g, else 0."""
    per_group = state.ones.numel() // groups
    kind = "group_mean" if scale == 1.0 else "scaled_group_mean"
    return state.constant(
        kind, (groups, scale), lambda like: state.membership(groups) * (scale / per_group)
    )


def _cell_ones(state: _SyncState, cells: int) -> Tensor:
    return state.constant("cell_ones", cells, lambda like: like.new_ones(cells))


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
        state = self._sync_state(input, channels, self._sync_group(), shifted=False)
        scratch = state.constant("cell_scratch", cells.size(1),
                                 lambda like: like.new_zeros(2, cells.size(1)))  # fmt: skip
        cell_mean, cell_var = (m.view(batch, channels) for m in
                               kernels.channel_moments(cells.detach(), scratch))  # fmt: skip
        self._update_estimates(state, cell_mean, cell_var, cells.size(2))
        for make in (_group_average, _group_mean):  # made now, not inside the Function
            make(state, self.num_groups)
        _group_mean(state, self.num_groups, -1.0 / cells.size(2)), _cell_ones(state, cells.size(1))
        # The Function reads the estimates in forward and saves only what it derives: a
        # later call may update them in place before this call's backward.
        estimates = (self.running_mean.to(cell_mean.dtype), self.running_var.to(cell_mean.dtype))
        output = _EstimatedBatchChannelNormFunction.apply(
            cells,
            self.weight,
            self.bias,
            self.group_weight,
            self.group_bias,
            state,
            estimates,
            (cell_mean, cell_var),
            self.num_groups,
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
        self, state: _SyncState, cell_mean: Tensor, cell_var: Tensor, length: int
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
        lengths = state.constant("lengths", (batch, length),
                                 lambda like: like.new_full((1, batch), float(length)))  # fmt: skip
        buffer = channel.new_buffer()
        torch.matmul(lengths, centred, out=buffer[: 2 * channels].view(2, 1, channels))
        summed = channel.all_reduce(buffer, "forward")
        steps = summed[:-1].view(2, channels) / summed[-1]  # mu - mu_hat, s^2
        steps[1].sub_(self.running_var)  # s^2 - sigma_hat^2
        nonfinite, mismatch = channel.flag("nonfinite"), channel.flag("forward")
        nonfinite.addmv_(state.zeros, summed[:-1])
        ok = torch.eq(mismatch, nonfinite).view(())
        self.num_batches_tracked.add_(ok)
        if batch * length == 0:  # maybe empty on every rank: then the steps are 0 / 0
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
