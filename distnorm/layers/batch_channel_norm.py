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
  format (``channels_last`` is preserved). In large-batch mode the batch part's output
  is the input's dtype, as SyncBatchNorm returns it, before the channel part.
* Eval mode computes exactly what :meth:`BatchChannelNorm.to_torch` (torch's BatchNorm
  followed by torch's GroupNorm) computes, bit for bit for inputs of the layer's dtype:
  the same kernels on the same values.

What it costs: in micro-batch training, one all-reduce of ``2C + 1`` values per step (none
for a group of one rank or in eval mode; 9 more with the mismatch check) and, besides
torch's BatchNorm (inference kernel) and GroupNorm kernels, the update's passes over the
data: ``X - mu_hat``, its sum, its squares' sum. The backward pass is those kernels', with
no collective. Large-batch mode costs SyncBatchNorm's collectives plus the GroupNorm.
Measured on a shared 2-core CPU, forward+backward of (32, 64, 28, 28) fp32 NCHW, one
process: 1.14x (micro-batch) and 1.19x (large-batch) ``Sequential(nn.BatchNorm2d,
nn.GroupNorm)``. Half-precision inputs add an fp32 copy of the activation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from distnorm import comm
from distnorm.errors import InputError, layer_label
from distnorm.layers.group_norm import DEFAULT_NUM_GROUPS, check_num_groups, choose_num_groups
from distnorm.layers.sync_batchnorm import SyncBatchNorm, _stats_dtype

# The paper's r. Not stated in the official code (a buffer set to 0 there, changed by
# training scripts it does not include); BatchNorm's momentum, the role r plays.
DEFAULT_ESTIMATE_RATE = 0.1


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
        dtype = _stats_dtype(input.dtype)
        if self.estimated:
            normalized = self._estimated_batch_norm(input, dtype)
        else:
            normalized = self._batch_norm(input, self.weight, self.bias).to(dtype)
        return self._channel_norm(normalized).to(input.dtype)

    def _estimated_batch_norm(self, input: Tensor, dtype: torch.dtype) -> Tensor:
        """The micro-batch batch part, in ``dtype``: update the estimates (training), then
        normalize with them through torch's inference BatchNorm kernel, whose backward
        treats the statistics as the constants they are here."""
        values = input.to(dtype)
        if self.training:
            self._update_estimates(values.detach())
        # Copies: autograd keeps the statistics for backward, and the next training call
        # updates the buffers in place (before this call's backward, under gradient
        # accumulation).
        mean = self.running_mean.to(dtype, copy=True)
        var = self.running_var.to(dtype, copy=True)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.batch_norm(values, mean, var, weight, bias, False, 0.0, self.eps)

    @torch.no_grad()
    def _update_estimates(self, values: Tensor) -> None:
        """``mu_hat += r (mu - mu_hat)``, ``sigma_hat^2 += r (s^2 - sigma_hat^2)`` with the
        statistics of the whole group's batch, from one all-reduce of 2C + 1 values, and the
        batch counted. A batch whose sums are not finite (a NaN or Inf on any rank, hence
        on every rank alike) changes nothing and is reported as ``nonfinite`` says."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        channels = values.size(1)
        dims = [0] + list(range(2, values.dim()))
        shape = [1, channels] + [1] * (values.dim() - 2)
        old_mean = self.running_mean.to(values.dtype)
        old_var = self.running_var.to(values.dtype)

        centred = values - old_mean.view(shape)  # a temporary: squared in place below
        local_sum = centred.sum(dim=dims)
        local_sum_sq = centred.square_().sum(dim=dims)
        local_count = values.new_full((1,), values.numel() // channels)
        parts = [local_sum, local_sum_sq, local_count]
        if comm.group_size(self.process_group) > 1:
            tag = self._sync_tag(values)
            packed = comm.all_reduce_sum(parts, self.process_group, tag, "forward")
        else:
            packed = torch.cat(parts)
        finite = torch.isfinite(packed).all()
        self._report_nonfinite(finite)
        self.num_batches_tracked.add_(finite.to(self.num_batches_tracked.dtype))
        total_sum, total_sum_sq, count = packed[:channels], packed[channels:-1], packed[-1]

        # r, or 0 when the group's batch is empty: the estimates then stay, bit for bit,
        # and no rank needs the count on the host.
        rate = count.gt(0).to(values.dtype) * self.estimate_rate
        denominator = count.clamp(min=1)
        mean_step = total_sum / denominator  # mu - mu_hat
        var_step = total_sum_sq / denominator - old_var  # s^2 - sigma_hat^2
        self.running_mean.copy_(torch.where(finite, old_mean + rate * mean_step, old_mean))
        self.running_var.copy_(torch.where(finite, old_var + rate * var_step, old_var))

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
