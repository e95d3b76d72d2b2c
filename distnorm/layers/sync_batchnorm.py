"""Synchronized BatchNorm: the statistics of a whole group's batch, one all-reduce each way.

Maths: Ioffe & Szegedy (2015), "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", Algorithm 1, with the mini-batch B taken as the
concatenation of the batches of every rank in the process group (cross-GPU BatchNorm,
Peng et al. 2018, "MegDet", arXiv:1711.07240)::

    mu      = 1/m * sum_i x_i                      (m values per channel, over all ranks)
    sigma^2 = 1/m * sum_i (x_i - mu)^2
    xhat_i  = (x_i - mu) / sqrt(sigma^2 + eps)
    y_i     = gamma * xhat_i + beta

and, in backward, the chain rule of Algorithm 1 (Ioffe & Szegedy, Sec. 3)::

    dL/dx_i = gamma / sqrt(sigma^2 + eps) * (g_i - mean_j g_j - xhat_i * mean_j(g_j * xhat_j))

where the two means again run over the whole group's batch.

What it guarantees:

* Exactly the statistics of the concatenated batch, whatever each rank holds: uneven batch
  sizes, and ranks with an empty batch (which still join both collectives and get a zero
  local gradient for weight and bias, as they contributed nothing).
* Communication of a fixed size: forward all-reduces ``[sum(x-K), sum((x-K)^2), count]``
  (``2C + 1`` values), backward ``[sum(dxhat), sum(dxhat * xhat)]`` (``2C``), whatever the
  world size. ``torch.nn.SyncBatchNorm`` all-gathers ``W * (2C + 1)`` values instead.
* A numerically stable variance. Each rank's per-channel mean and variance come from torch's
  own kernel (a two-pass variance about the rank's mean), and the ranks' parts are summed
  about a per-channel shift ``K`` that every rank holds bit for bit (the previous step's
  global mean): ``sum(x-K) = n (mean - K)``, ``sum((x-K)^2) = n (var + (mean - K)^2)``, the
  "shifted data" formula of Chan, Golub & LeVeque (1983, "Algorithms for computing the
  sample variance: analysis and recommendations"). ``E[(x-K)^2] - E[x-K]^2`` loses nothing
  when ``K`` is near the mean, where sums of ``x`` and ``x^2`` combined as
  ``E[x^2] - E[x]^2`` in fp32 lose everything once ``|mean| >> std``. What remains is
  torch's own precision: the fp32 mean of a channel is rounded to fp32, which costs a
  relative ``(|mean| / std * 6e-8)^2`` of the variance (measured: under 1e-3 at
  ``|mean| / std = 1e5``, about 1e-2 at 1e6, as torch's BatchNorm on one process).
  The first training call of a layer has no previous mean, so it makes one extra
  all-reduce of ``C + 1`` values to agree on one; every later call makes exactly one.
* fp16/bf16 inputs keep fp32 statistics and communication (fp64 inputs keep fp64); the
  output has the input's dtype and memory format (``channels_last`` is preserved). Their
  input gradient is rounded to the input's dtype twice (two kernel passes and an add),
  where torch's kernel rounds it once.
* Running statistics updated as ``nn.BatchNorm`` would on the concatenated batch: unbiased
  variance over the global count, cumulative average when ``momentum=None``.
* Mismatched calls are caught, not mixed (``check_sync``; the default ``None`` checks
  CPU tensors and leaves CUDA ones unchecked, see the costs below): each
  collective carries a 9-value tag naming the layer, the direction and the training call,
  and every rank checks in the summed tag that all ranks sent the same one (the scheme is
  in :mod:`distnorm.comm`). Ranks that call synchronized layers differently (layer A on
  one rank, layer B on another; a layer called twice on one rank; a backward that skips a
  layer on one rank) raise :class:`~distnorm.errors.SyncMismatchError` on every rank, each
  naming the layer it was in, before any statistic is used, instead of mixing two layers'
  statistics or waiting for a collective no one else joins. Collectives of layers of the
  same width have the same size (the shift's and the backward's are padded to ``2C + 1``);
  layers of different widths make gloo abort the process with the smaller payload and the
  other rank raise (no hang, but not this error). With NCCL, different sizes may hang until
  the process group's timeout. A layer's identity is the qualified name convert_model gave
  it; layers built directly are known by class and width only, and two of those of the
  same width are told apart by their call counts alone. Under torch.compile the check is a
  device-side assert (a ``RuntimeError`` with the same message, no graph break) and calls
  are not counted.
* A batch whose statistics are not finite (a NaN or Inf in any rank's batch, or squares
  that overflow) leaves the running statistics and the shift as they were and is not
  counted in ``num_batches_tracked``, on every rank alike, since the decision comes from
  summed values: later steps are exact again. ``nonfinite="warn"`` (default) warns once
  per process, ``"raise"`` raises :class:`~distnorm.errors.InputError` on every rank,
  ``"skip"`` says nothing. Its output is non-finite, as the batch is.

What it costs: the two collectives above, and the passes torch's own BatchNorm makes, done by
torch's own kernels (:mod:`distnorm.layers.kernels`): forward, the moments and one affine
pass; backward, one pass for the two gradient sums and one for the input gradient (plus an
add for half-precision inputs). Measured on CPU in one process (``small_resnet``, batch 8,
one thread, the synchronized path with the collectives replaced by nothing): a training
step 1.09x the same step with ``nn.BatchNorm2d``. The rest of a distributed step's cost is
the collectives' latency, two per layer, which the scaling benchmark measures against a
"local BN + the same collectives" floor. The mismatch check adds 9
values to each collective (10 to the backward's, padded) and, per collective, a tag built
on the host and a host read of 9 summed values. On 2 gloo ranks of a shared 2-core CPU,
the time spent in that code was 1.2% of a forward+backward of (8, 64, 56, 56) fp32 and
1.4% of (32, 256, 14, 14) (both about 25 ms there; medians of 300 repeats, timed where the
check runs, in the same run as the layer). On CUDA the host read is a device synchronization per
collective (not measured here: no GPU); ``check_sync=False`` removes the check. The
non-finite guard decides on the device; its report (``"warn"``, ``"raise"``) reads one
flag on the host per call, which ``"skip"`` avoids. In eval mode, or when the group has a
single rank (including no process group at all), it *is* torch's BatchNorm, bit for bit,
with no communication, no check and no non-finite guard.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from distnorm import comm
from distnorm.errors import InputError, layer_label
from distnorm.layers import kernels
from distnorm.layers.inputs import check_channels_input

# What a training batch with non-finite statistics does, besides leaving the running
# statistics alone: see SyncBatchNorm's ``nonfinite``.
NONFINITE_POLICIES = ("warn", "raise", "skip")

# Whether this process has warned of a non-finite batch: a NaN reaching one layer reaches
# every layer after it, so one warning says it all.
_nonfinite_warned = False


def _per_channel(per_group: Tensor, channels: int) -> Tensor:
    """Per-group vectors (..., G) repeated for each group's consecutive channels: (..., C).
    Always dense, never a stride-0 view (G = 1): torch's kernels read them as dense."""
    groups = per_group.size(-1)
    if groups == channels:
        return per_group
    repeated = per_group.unsqueeze(-1).expand(*per_group.shape, channels // groups)
    return repeated.reshape(*per_group.shape[:-1], channels).contiguous()


# Above this many values, a grouped BatchNorm in one process is faster fused (four passes
# over the data and a few dozen operations on C-sized vectors, some 0.4 ms on CPU) than as
# torch's kernel on the grouped view (six passes, no vector arithmetic). Measured with the
# layer-overhead benchmark on a 2-core CPU, fp32 and bf16: the kernel's way ahead up to
# 1.6M values (2x64x14x14: 1.4x BatchNorm's time against 4.0x fused), the fused way from
# 6.4M (32x64x56x56 fp32: 1.3x against 1.6x).
GROUPED_KERNEL_MAX_VALUES = 1 << 22


def _kernel_is_faster(input: Tensor, groups: int) -> bool:
    """Whether the batch norm of ``input`` over this rank alone, with ``groups``
    statistics, is faster as torch's kernel (:meth:`SyncBatchNorm._local_batch_norm`) than
    fused: always per channel; per group of channels, for small contiguous inputs (the
    grouped view of a channels-last input has its groups' channels innermost, a layout the
    kernel is an order of magnitude slower on)."""
    if groups == input.size(1):
        return True
    return input.is_contiguous() and input.numel() <= GROUPED_KERNEL_MAX_VALUES


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalization over the concatenated batch of ``group``'s ranks, with one
    statistic per group of ``C / G`` consecutive channels (G = C: BatchNorm; fewer:
    BatchGroupNorm), G being the size of ``shift``.

    Forward returns ``(output, mean, var, count)``; the last three (per group: mean, biased
    variance, global element count) are non-differentiable and feed the running
    statistics. Besides the collective, each direction makes the passes of torch's own
    BatchNorm (moments, affine; gradient sums, input gradient), done by torch's kernels
    (:mod:`distnorm.layers.kernels`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        shift: Tensor,
        eps: float,
        group: comm.Group,
        tag: comm.SyncTag | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        channels, groups = input.size(1), shift.numel()
        count_per_channel = input.numel() // channels

        # The one forward collective, [sum(x-K), sum((x-K)^2), count] per group (2G + 1
        # values), from each channel's mean and variance about its own mean: sum(x-K) =
        # n (mean - K), sum((x-K)^2) = n (var + (mean - K)^2), exact and free of cancellation.
        channel_mean, channel_var = (m.view(groups, -1) for m in kernels.channel_moments(input))
        deviation = channel_mean - shift.unsqueeze(1)  # mean - K, per channel
        sums = torch.stack((deviation, channel_var + deviation.square())).sum(dim=2)
        local_count = shift.new_full((1,), input.numel() // groups)
        packed = comm.all_reduce_sum(
            [sums.view(-1) * count_per_channel, local_count], group, tag, "forward"
        )
        count = packed[-1]

        # E[x - K] and E[(x - K)^2] over the group's batch, so mu = K + E[x - K].
        mean_offset, mean_square = packed[:-1].view(2, groups) / count.clamp(min=1)
        var = (mean_square - mean_offset.square()).clamp(min=0)
        mean = shift + mean_offset

        # y = (x - mu) * invstd * gamma + beta
        centre, invstd = _per_channel(torch.stack((mean, torch.rsqrt(var + eps))), channels)
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        beta = torch.zeros_like(scale) if bias is None else bias.to(scale.dtype)
        output = kernels.channel_affine(input, centre, scale, beta)

        ctx.save_for_backward(input, weight, centre, invstd, count)
        ctx.group, ctx.tag, ctx.groups = group, tag, groups
        ctx.mark_non_differentiable(mean, var, count)
        return output, mean, var, count

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_output: Tensor, *_unused_stat_grads: Tensor
    ) -> tuple[Tensor | None, ...]:
        input, weight, centre, invstd, count = ctx.saved_tensors
        channels, groups = input.size(1), ctx.groups

        # sum(g) and sum(g * xhat) per channel, xhat = (x - mu) * invstd: the gradients of
        # beta and gamma, this rank's share (DDP, or the user, sums the shares across
        # ranks, exactly as for any other parameter).
        sum_grad, sum_grad_centred = kernels.centred_grad_sums(grad_output, input, centre)
        sum_grad_xhat = sum_grad_centred * invstd
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_weight = sum_grad_xhat.to(weight.dtype) if needs_weight else None
        grad_bias = sum_grad.to(weight.dtype) if needs_bias else None

        grad_input = None
        if needs_input:
            # The one backward collective, per group [sum(dxhat), sum(dxhat * xhat)] (2G
            # values), with dxhat = gamma * g the gradient of the normalized values.
            gamma = torch.ones_like(invstd) if weight is None else weight.to(invstd.dtype)
            sums = (torch.stack((sum_grad, sum_grad_xhat)) * gamma).view(2, groups, -1).sum(dim=2)
            packed = comm.all_reduce_sum([sums.view(-1)], ctx.group, ctx.tag, "backward")
            means = packed.view(2, groups) / count.clamp(min=1)
            mean_dxhat, mean_dxhat_xhat = _per_channel(means, channels)
            # dx = invstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
            #    = g * gamma * invstd  +  (x - mu) * slope  +  constant, per channel
            slope = -invstd.square() * mean_dxhat_xhat
            constant = -invstd * mean_dxhat
            grad_input = kernels.scaled_grad_plus_affine(
                grad_output, gamma * invstd, input, centre, slope, constant
            )
        return grad_input, grad_weight, grad_bias, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    r"""Drop-in for ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` on inputs ``(N, C, *)``
    whose training statistics span every rank of ``process_group``.

    Same constructor, parameters, buffers and ``state_dict`` keys as ``nn.SyncBatchNorm``,
    so checkpoints load both ways. See the module docstring for the maths, guarantees and
    costs. ``process_group=None`` means the default (world) group.

    ``check_sync`` (attribute of the same name): check, inside each collective, that every
    rank of the group is in the same one (see the module docstring); ``None`` (default)
    checks CPU tensors only, ``True`` CUDA ones too (a host read per collective).
    ``nonfinite`` (attribute of the same name): what a training batch with non-finite
    statistics does besides leaving the running statistics alone, on every rank: ``"warn"``
    (once per process), ``"raise"`` (:class:`~distnorm.errors.InputError`) or ``"skip"``
    (nothing, and no host read).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: comm.Group = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        check_sync: bool | None = None,
        nonfinite: str = "warn",
    ) -> None:
        # ``bias=False`` (an affine weight without a bias) exists from torch 2.13 on; it is
        # passed only when asked for, so that older torch keeps working.
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
            **({} if bias else {"bias": False}),
        )  # fmt: skip
        self._init_sync_state(process_group, check_sync, nonfinite)

    def _init_sync_state(
        self, process_group: comm.Group, check_sync: bool | None = None, nonfinite: str = "warn"
    ) -> None:
        """Attributes a synchronized layer holds besides those of ``_BatchNorm``; also
        called by :func:`distnorm.convert_model` on modules it re-classes, once it has
        named them (the name is the layer's identity in the mismatch check)."""
        if nonfinite not in NONFINITE_POLICIES:
            raise InputError(
                f"{layer_label(self)}: nonfinite={nonfinite!r}; choose one of "
                f"{', '.join(NONFINITE_POLICIES)}"
            )
        self.process_group = process_group
        self.check_sync = None if check_sync is None else bool(check_sync)
        self.nonfinite = nonfinite
        # Per-channel shift about which the sums are taken: the previous global batch
        # mean, identical on every rank because it is computed from all-reduced values.
        # Derived communication state, not model state, hence not a buffer.
        self._shift: Tensor | None = None
        # The mismatch check's identity of this layer, the same on every rank (its qualified
        # name, or its class and width when built directly), its label for messages, and
        # its count of checked training calls.
        name = getattr(self, "_distnorm_name", None)
        self._sync_layer_id = comm.layer_id(name or f"{type(self).__name__}({self.num_features})")
        self._sync_label = layer_label(self)
        self._sync_calls = 0

    def _check_input_dim(self, input: Tensor) -> None:
        check_channels_input(self, input, self.num_features)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return self._batch_norm(input, self.weight, self.bias)

    def _batch_norm(
        self, input: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int | None = None
    ) -> Tensor:
        """BatchNorm of ``input`` (N, C, *) with the given per-channel affine (None for
        none) and one statistic per group of ``C / groups`` consecutive channels (None: per
        channel), which is also the size of this layer's running statistics.

        The core that :class:`SyncBatchNorm` applies with a statistic per channel, and that
        layers normalizing over other groupings of the same values apply with theirs
        (BatchGroupNorm: per group of channels). Training with peers takes the fused,
        synchronized path (:class:`_SyncBatchNormFunction`); so do large or channels-last
        inputs grouped over channels in one process (over :data:`comm.LOCAL`), see
        :func:`_kernel_is_faster`; everything else is torch's kernel
        (:meth:`_local_batch_norm`).
        """
        channels = input.size(1)
        groups = channels if groups is None else groups
        group, tag = self._sync_target(input, groups) if self.training else (comm.LOCAL, None)
        batch_stats = self.training or self.running_mean is None or self.running_var is None
        if not batch_stats or (group is comm.LOCAL and _kernel_is_faster(input, groups)):
            return self._local_batch_norm(input, weight, bias, groups)

        # Batch statistics of the whole group's batch, or of large or channels-last inputs
        # grouped over channels: the fused path computes them, summed over this rank alone
        # (comm.LOCAL) when there is nothing to synchronize.
        shift = self._agreed_shift(input, groups, group, tag)
        output, mean, var, count = _SyncBatchNormFunction.apply(
            input, weight, bias, shift, self.eps, group, tag
        )
        if not self.training:  # eval without running statistics: nothing to update
            return output
        # Statistics summed over the group are non-finite on every rank alike when any rank's
        # batch holds a NaN or Inf: every rank then keeps its shift and running statistics.
        finite = torch.isfinite(mean + var).all()
        self._shift = torch.where(finite, mean, shift).detach()
        self._report_nonfinite(finite)

        # Only a rank holding fewer than two values per statistic can belong to a group that
        # holds fewer than two in all, so only such a rank reads the global count on the host.
        group_batch_is_empty = False
        if input.numel() < 2 * groups:
            global_count = int(count.item())
            if global_count == 1:
                raise InputError(
                    f"{layer_label(self)} got 1 value per channel across its whole group "
                    f"({comm.describe_group(group)}) in training mode; BatchNorm "
                    "needs at least 2: use a larger batch, a larger sync group, or a "
                    "normalization without batch statistics"
                )
            group_batch_is_empty = global_count == 0
        if self.track_running_stats:
            self._update_running_stats(mean, var, count, group_batch_is_empty, finite)
        return output

    def _sync_target(self, input: Tensor, groups: int) -> tuple[comm.Group, comm.SyncTag | None]:
        """Where this training call's collectives go, and the tag they carry: the layer's
        process group and :meth:`_sync_tag`; or :data:`comm.LOCAL` and no tag when the group
        is this rank alone (nothing to sum with, nothing to check)."""
        if comm.group_size(self.process_group) == 1:
            return comm.LOCAL, None
        return self.process_group, self._sync_tag(input, groups)

    def _sync_tag(self, input: Tensor, groups: int) -> comm.SyncTag | None:
        """The tag of this training call's collectives, and the call counted; None when
        the check is off. Every collective of the layer is padded to the forward's
        ``2G + 1`` values (G statistics: C for BatchNorm), so that tags, not sizes, tell
        them apart. Calls compiled by torch.compile are not counted (call 0): a new integer
        at every call would make it recompile every call."""
        # None: on for CPU tensors, where the check measured under 2% of the layer's time;
        # off for CUDA ones, where reading the tag on the host is a device synchronization
        # per collective whose cost has not been measured (no GPU in the test runs).
        checked = self.check_sync if self.check_sync is not None else not input.is_cuda
        if not checked:
            return None
        call = 0
        if not torch.compiler.is_compiling():
            self._sync_calls += 1
            call = self._sync_calls
        return comm.SyncTag(self._sync_label, self._sync_layer_id, call, 2 * groups + 1)

    def _report_nonfinite(self, finite: Tensor) -> None:
        """Warn (once per process) or raise, as ``self.nonfinite`` says, when ``finite`` is
        False; the same on every rank, as ``finite`` comes from summed values. Under
        torch.compile, "raise" is a device-side assert (a RuntimeError with the same
        message) and "warn" stays silent, so that no graph breaks."""
        if self.nonfinite == "skip":
            return
        if torch.compiler.is_compiling():
            if self.nonfinite == "raise":
                torch._assert_async(finite, self._nonfinite_message())
            return
        if bool(finite):
            return
        if self.nonfinite == "raise":
            raise InputError(self._nonfinite_message())
        global _nonfinite_warned
        if not _nonfinite_warned:
            _nonfinite_warned = True
            warnings.warn(self._nonfinite_message(), RuntimeWarning, stacklevel=2)

    def _nonfinite_message(self) -> str:
        message = (
            f"{layer_label(self)}: a training batch's statistics are not finite (a NaN or Inf "
            f"in the batch of a rank of {comm.describe_group(self.process_group)}); the "
            "layer's running statistics were left as they were, on every rank, and the "
            "batch is not counted in num_batches_tracked."
        )
        if self.nonfinite == "raise":
            return message
        return (
            f"{message} Later layers that see non-finite statistics do the same; this is "
            "reported once per process. nonfinite='raise' on the synchronized layers stops "
            "at the first such batch instead."
        )

    def _local_batch_norm(
        self, input: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int
    ) -> Tensor:
        """``nn.BatchNorm``'s own forward, with the affine passed in and one statistic per
        group of ``C / groups`` channels: torch's kernel, and no communication (eval mode, or
        a group of one rank). With a statistic per channel it is ``nn.BatchNorm``, bit for
        bit. With fewer, the kernel normalizes the input viewed as ``(N, G, C/G * prod(*))``,
        whose channels are the groups (running statistics per group, updated by the kernel),
        and its inference pass applies the per-channel affine: two kernels each way and no
        arithmetic on small vectors."""
        if self.training and input.numel() == groups:  # possible only with G = C
            raise InputError(
                f"{layer_label(self)} got 1 value per channel (input of shape "
                f"{tuple(input.shape)}) in training mode, with no other rank to share statistics "
                f"with ({comm.describe_group(self.process_group)}); BatchNorm needs at least 2. "
                "Use a larger per-worker batch; or convert the layer to 'sync_bn' over ranks "
                "whose batches together hold 2 or more values; or to a normalization without "
                "batch statistics: 'gn_ws' (training from scratch) or 'frozen_bn' (fine-tuning)"
            )
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        # Batch statistics in training, and in eval when there are no running statistics.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Running statistics are read in eval and updated in training only when tracked.
        keep_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep_running else None
        running_var = self.running_var if keep_running else None
        if groups == input.size(1):
            return F.batch_norm(
                input, running_mean, running_var, weight, bias, use_batch_stats, factor, self.eps
            )
        # A view when the input is contiguous, which _kernel_is_faster requires in training.
        grouped = input.reshape(input.size(0), groups, -1)
        normalized = F.batch_norm(
            grouped, running_mean, running_var, None, None, use_batch_stats, factor, self.eps
        ).view(input.shape)
        if weight is None and bias is None:
            return normalized
        parameter = weight if weight is not None else bias
        assert parameter is not None
        scale = weight if weight is not None else torch.ones_like(parameter)
        offset = bias if bias is not None else torch.zeros_like(parameter)
        return kernels.channel_affine(normalized, torch.zeros_like(parameter), scale, offset)

    def _agreed_shift(
        self, input: Tensor, groups: int, group: comm.Group, tag: comm.SyncTag | None
    ) -> Tensor:
        """The shift every rank holds, one per statistic; on the first training call, the
        global mean from one extra all-reduce of ``[sum(x), count]``. A non-finite mean
        becomes 0, as valid a shift, so that a NaN in the first batch does not reach every
        later call."""
        if self._shift is not None:
            return self._shift.to(device=input.device, dtype=kernels.stats_dtype(input.dtype))
        channel_mean, _ = kernels.channel_moments(input.detach())  # no gradient: K is a constant
        count_per_channel = input.numel() // input.size(1)
        parts = [
            channel_mean.view(groups, -1).sum(dim=1) * count_per_channel,
            channel_mean.new_full((1,), input.numel() // groups),
        ]
        packed = comm.all_reduce_sum(parts, group, tag, "shift")
        mean = packed[:-1] / packed[-1].clamp(min=1)
        return torch.nan_to_num(mean, nan=0.0, posinf=0.0, neginf=0.0)

    @torch.no_grad()
    def _update_running_stats(
        self, mean: Tensor, var: Tensor, count: Tensor, group_batch_is_empty: bool, finite: Tensor
    ) -> None:
        """``running = (1 - f) * running + f * batch`` with the unbiased global variance,
        ``f = momentum``, or ``1 / num_batches_tracked`` when momentum is None. An empty
        group batch counts as a batch but leaves the statistics alone, as in nn.BatchNorm;
        a batch whose statistics are not ``finite`` neither counts nor changes anything.
        Decided on the device: no host read."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(finite.to(self.num_batches_tracked.dtype))
        if group_batch_is_empty:
            return
        factor: float | Tensor = self.momentum if self.momentum is not None else (
            1.0 / self.num_batches_tracked.clamp(min=1).to(self.running_mean.dtype)
        )  # fmt: skip
        unbiased_var = var * (count / (count - 1))
        for running, batch in ((self.running_mean, mean), (self.running_var, unbiased_var)):
            # running + f * (batch - running); with batch := running, exactly running.
            running.lerp_(torch.where(finite, batch.to(running.dtype), running), factor)
