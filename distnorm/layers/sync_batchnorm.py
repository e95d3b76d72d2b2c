"""Synchronized BatchNorm: the statistics of a whole group's batch, one all-reduce each way.

Maths: Ioffe & Szegedy (2015), "Batch Normalization", Algorithm 1 and the chain rule of
Sec. 3, with the mini-batch taken as the concatenation of every rank's batch (cross-GPU
BatchNorm, Peng et al. 2018, "MegDet")::

    mu = 1/m sum x,   sigma^2 = 1/m sum (x - mu)^2,   xhat = (x - mu) / sqrt(sigma^2 + eps)
    y = gamma xhat + beta,   dx = gamma / sqrt(sigma^2 + eps) (g - mean(g) - xhat mean(g xhat))

with every sum and mean over all ranks. Guarantees: exactly the concatenated batch's
statistics for uneven and empty per-rank batches; each rank's moments summed about a
per-channel shift K that all ranks hold bit for bit (the previous global mean; Chan, Golub
& LeVeque 1983), so no large mean cancels in fp32; fp32 statistics and communication for
half inputs; output in the input's dtype and memory format; running statistics as
nn.BatchNorm's on the concatenated batch. Without peers, or in eval, it is torch's
BatchNorm bit for bit.

Checks, on the device (``check_sync``, ``nonfinite``): every collective carries a tag that
tells whether all ranks were in the same one (:mod:`distnorm.comm`); a mismatched or
non-finite batch leaves the shift and running statistics untouched on every rank, and
:mod:`distnorm.health` raises or warns on the host, once a step, for the whole model. A
forward recomputed in backward (activation checkpointing) updates nothing a second time.
``accumulation_steps=k``: the group's last k micro-batches (:mod:`.accumulation`).

Cost per training call: one all-reduce of ``2C + 1`` values each way (plus the tag),
whatever the world size (one more, once, to agree on K); the passes of torch's own
BatchNorm, by its kernels (CUDA: the fused SyncBN kernels); a fixed, published number of
operations on C-sized vectors (``benchmarks/dispatch.py``), none of them host reads.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Hashable
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.optimizer import register_optimizer_step_pre_hook

from distnorm import comm, health
from distnorm.errors import InputError, SyncMismatchError, layer_label
from distnorm.layers import kernels
from distnorm.layers.accumulation import StatisticsWindow
from distnorm.layers.inputs import check_channels_input

# What a training batch with non-finite statistics does, besides leaving the running
# statistics alone: see SyncBatchNorm's ``nonfinite``.
NONFINITE_POLICIES = ("warn", "raise", "skip")

# Above this many values, a grouped BatchNorm in one process is faster fused than as torch's
# kernel on the grouped view (benchmarks/results/layer_overhead.md has the crossing).
GROUPED_KERNEL_MAX_VALUES = 1 << 22

T = TypeVar("T")

# Layers built directly (not named by convert_model) are told apart by construction order.
_unnamed_layers = itertools.count()


def recomputing() -> bool:
    """Whether this forward call runs inside a backward pass: activation checkpointing
    (``torch.utils.checkpoint``, reentrant or not) recomputing a forward whose statistics
    and state updates already happened."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _kernel_is_faster(input: Tensor, groups: int) -> bool:
    """Whether the batch norm of ``input`` over this rank alone, with ``groups``
    statistics, is faster as torch's kernel (:meth:`SyncBatchNorm._local_batch_norm`) than
    fused: always per channel; per group of channels, for small contiguous inputs (the
    grouped view of a channels-last input is a layout the kernel is slow on)."""
    if groups == input.size(1):
        return True
    return input.is_contiguous() and input.numel() <= GROUPED_KERNEL_MAX_VALUES


class _SyncState(health.Reporter):
    """What a synchronized layer keeps between training calls on one device, dtype,
    grouping and process group: its collectives, the shift, and constants, allocated once
    and updated in place (so a captured CUDA graph replays them). Reports what its flags
    found to :mod:`distnorm.health`, on the layer's behalf."""

    def __init__(self, layer: SyncBatchNorm, input: Tensor, groups: int, group: comm.Group):
        dtype = kernels.stats_dtype(input.dtype)
        like = torch.empty(0, device=input.device, dtype=dtype)
        channels = input.size(1)
        checked = layer.check_sync is not False
        steps = layer.accumulation_steps
        self.key = self.key_for(layer, input, groups, group)
        self.groups = groups
        # Gradient accumulation: the statistics of the last ``steps`` micro-batches.
        self.window = StatisticsWindow(steps, groups, like) if steps > 1 else None
        self.recomputing = False  # whether the call being made recomputes a forward
        self.channel = comm.SyncChannel(
            group, 2 * groups, layer._sync_layer_id, like, checked, layer_label(layer)
        )
        self.flags = self.channel.flags
        self.shift: Tensor | None = None
        self.scratch = like.new_zeros(2, channels)  # running statistics for the moments kernel
        self.zeros = like.new_zeros(1, 2 * groups)  # 0 * statistics: NaN where they are not
        self.zero = like.new_zeros(())
        self.ones = like.new_ones(channels)
        self.layer = weakref.ref(layer)
        self.calls = 0
        # Made while torch.compile traces the first call: its flags are then that graph's own
        # outputs, which the graph's backward may not update (AOTAutograd); from the next
        # call on they are the graph's inputs, and the backward checks again.
        self.traced = torch.compiler.is_compiling()
        self._like = like
        self._constants: dict[str, tuple[Hashable, Any]] = {}

    @staticmethod
    def key_for(layer: SyncBatchNorm, input: Tensor, groups: int, group: comm.Group) -> Hashable:
        """What a state is made for: a training call with another key needs a new one."""
        dtype = kernels.stats_dtype(input.dtype)
        checked = layer.check_sync is not False
        return (input.device, dtype, groups, group, checked, layer.accumulation_steps)

    def prepare(self, input: Tensor) -> None:
        """Everything a training call on ``input`` reads besides the input, made before the
        call's autograd Function runs (which then changes no Python state): the count its
        collectives send, and the group-sum matrices for its batch size."""
        per_statistic = input.numel() // self.groups
        self.channel.set_count(per_statistic)
        if self.groups != input.size(1):
            self.membership(self.groups)
            self.membership(self.groups, input.numel() // input.size(1))

    def constant(self, kind: str, key: Hashable, make: Callable[[Tensor], T]) -> T:
        """``make(like)`` (``like``: an empty tensor of the statistics' device and dtype),
        kept for ``kind`` until ``key`` (a batch size, a group count) changes: a constant of
        the layer's maths, made again only when the batch's shape changes."""
        kept = self._constants.get(kind)
        if kept is None or kept[0] != key:
            kept = self._constants[kind] = (key, make(self._like))
        return kept[1]

    def scratch_for(self, cells: Tensor) -> Tensor:
        """Running statistics for the moments kernel over ``cells``' dimension 1 (the
        channels themselves, or BatchChannelNorm's sample-channel cells)."""
        size = cells.size(1)
        if size == self.scratch.size(1):
            return self.scratch
        return self.constant("scratch", size, lambda like: like.new_zeros(2, size))

    def membership(self, groups: int, scale: int = 1) -> Tensor:
        """(C, groups): ``scale`` where channel c is in group g (consecutive channels), else
        0; a group sum (times ``scale``) as one matrix product."""
        channels = self.ones.numel()

        def make(like: Tensor) -> Tensor:
            eye = torch.eye(groups, dtype=like.dtype, device=like.device) * scale
            return eye.repeat_interleave(channels // groups, dim=0)

        kind = f"membership{groups}" + ("" if scale == 1 else "*")
        return self.constant(kind, scale, make)

    def act(self, values: list[float], calls: dict[str, int]) -> None:
        layer = self.layer()
        if layer is None:
            return
        flags = dict(zip(comm.SyncChannel.FLAGS, values, strict=True))
        for phase in [*calls, *comm.PHASES]:
            if flags.get(phase, 0.0) != 0.0:
                raise SyncMismatchError(
                    comm.mismatch_message(
                        self.channel.label, phase, self.channel.group, calls.get(phase)
                    )
                )
        if math.isnan(flags["nonfinite"]):
            layer._report_nonfinite()


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalization over the concatenated batch of ``state``'s group, with one
    statistic per group of ``C / G`` consecutive channels (G = C: BatchNorm; fewer:
    BatchGroupNorm), around one all-reduce each way.

    Forward returns ``(output, mean, var, count, ok)``; the last four (per group: mean,
    biased variance; the global count; whether the call's statistics may be used) are
    non-differentiable and feed the running statistics.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        state: _SyncState,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        channels, groups = input.size(1), state.groups
        weight, bias = (kernels.as_stats(p, state.zero.dtype) for p in (weight, bias))
        count = input.numel() // channels  # values per channel on this rank
        per_statistic = input.numel() // groups
        channel = state.channel
        shift = state.shift
        assert shift is not None

        # The forward collective: n (mean - K) and n (var + (mean - K)^2) per group, from
        # torch's per-channel moments (summed over each group's channels), and the count.
        channel_mean, channel_var = kernels.channel_moments(input, state.scratch)
        buffer = channel.new_buffer()
        payload = buffer[: 2 * groups].view(2, groups)
        if groups == channels:
            torch.sub(channel_mean, shift, out=payload[0])
            torch.addcmul(channel_var, payload[0], payload[0], out=payload[1])
            payload.mul_(count)
        else:
            deviation = torch.empty_like(state.scratch)
            torch.sub(channel_mean.view(groups, -1), shift.view(groups, 1),
                      out=deviation[0].view(groups, -1))  # fmt: skip
            torch.addcmul(channel_var, deviation[0], deviation[0], out=deviation[1])
            torch.mm(deviation, state.membership(groups, count), out=payload)
        summed = channel.all_reduce(buffer, "forward")
        total = divisor = summed[-1]
        if per_statistic < 2:  # so may the group's batch be: E[.] of nothing is 0, not NaN
            divisor = total.clamp(min=1)

        # E[x - K] and E[(x - K)^2] over the group's batch; mu = K + E[x - K].
        moments = summed[:-1].view(2, groups) / divisor
        stats = moments.new_empty(3, groups)  # mean, var, invstd per group
        mean, var, invstd = stats
        torch.add(shift, moments[0], out=mean)
        torch.addcmul(moments[1], moments[0], moments[0], value=-1, out=var).clamp_(min=0)
        # The call's statistics may be used: every rank was in this collective (its tag
        # check found nothing since the last report) and they are finite (NaN otherwise).
        nonfinite, mismatch = channel.flag("nonfinite"), channel.flag("forward")
        nonfinite.addmv_(state.zeros, summed[:-1])
        ok = torch.eq(mismatch, nonfinite).view(())
        slot = None
        if state.window is not None:  # gradient accumulation: the window's statistics
            total, ok, slot = state.window.pool(mean, var, total, ok, state.recomputing)
        torch.rsqrt(var + eps, out=invstd)

        if groups == channels:
            output = kernels.normalize(input, mean, var, invstd, weight, bias, eps)
            centre, channel_invstd = mean, invstd
            # The input gradient's factor; CUDA's fused backward kernel computes it itself.
            cuda_backward = input.is_cuda and input.numel() > 0
            scale = None if cuda_backward else invstd if weight is None else invstd * weight
        else:
            centre, channel_invstd = stats[::2].repeat_interleave(channels // groups, dim=1)
            scale = channel_invstd if weight is None else channel_invstd * weight
            output = kernels.channel_affine(input, centre, scale, bias, state.ones)

        ctx.save_for_backward(input, weight, centre, channel_invstd, scale, invstd, total, slot)
        ctx.state, ctx.eps, ctx.call = state, eps, state.calls
        ctx.mark_non_differentiable(mean, var, total, ok)
        ctx.set_materialize_grads(False)  # no zero gradients made for those four
        return output, mean, var, total, ok

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_output: Tensor, *_unused_stat_grads: Tensor
    ) -> tuple[Tensor | None, ...]:
        if grad_output is None:  # not materialized (only the statistics' grads are): zeros,
            grad_output = torch.zeros_like(ctx.saved_tensors[0])  # the collective still runs
        with kernels.full_precision(grad_output):
            return _SyncBatchNormFunction._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        # ``count``: the values the forward's statistics came from (the window's, with
        # gradient accumulation), by which the gradient's sums are averaged.
        input, weight, centre, channel_invstd, scale, invstd, count, slot = ctx.saved_tensors
        state: _SyncState = ctx.state
        channel = state.channel
        channels, groups = input.size(1), state.groups
        health.MONITOR.before_collective(state, "backward", ctx.call, first=False)
        health.MONITOR.at_backward()
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        gamma = state.ones if weight is None else weight
        buffer = channel.new_buffer()
        payload = buffer[: 2 * groups].view(2, groups)

        if groups == channels and input.is_cuda and input.numel() > 0:
            # torch's fused SyncBN kernels: the sums and parameter gradients in one pass,
            # the input gradient from the global sums in another (a gradient in neither
            # channels-last layout made contiguous first, as nn.SyncBatchNorm does).
            if not any(
                grad_output.is_contiguous(memory_format=layout)
                for layout in (torch.channels_last, torch.channels_last_3d)
            ):
                grad_output = grad_output.contiguous()
            sum_grad, sum_grad_centred, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
                grad_output, input, centre, invstd, gamma, True, needs_weight, needs_bias
            )
            torch.cat((sum_grad, sum_grad_centred), out=payload.view(-1))
            summed = channel.all_reduce(buffer, "backward", check=not state.traced)
            sums = summed[:-1].view(2, groups)
            if slot is not None:  # the window's, by sum(g (x - mu)) = sum(g xhat) / invstd
                sums = torch.stack((sums[0], sums[1] * invstd))
                sums = state.window.pooled_gradients(sums, slot, not state.traced)
                sums[1].div_(invstd)
            grad_input = torch.batch_norm_backward_elemt(
                grad_output, input, centre, invstd, weight, sums[0], sums[1],
                count.view(1).to(torch.int32),
            )  # fmt: skip
            return grad_input, grad_weight, grad_bias, None, None

        # sum(g * xhat) and sum(g) per channel, in one pass: gamma's and beta's gradients
        # (this rank's share: DDP sums the shares, as for any other parameter).
        grad_weight, grad_bias = kernels.grad_sums(
            grad_output, input, centre, channel_invstd, state.ones
        )
        # The one backward collective, per group [sum(dxhat), sum(dxhat * xhat)] with
        # dxhat = gamma * g: per channel, gamma applied after the means.
        if groups == channels:
            torch.cat((grad_bias, grad_weight), out=payload.view(-1))
        else:
            member = state.membership(groups)
            weighted = member if weight is None else member * weight.view(-1, 1)
            torch.mm(torch.stack((grad_bias, grad_weight)), weighted, out=payload)
        summed = channel.all_reduce(buffer, "backward", check=not state.traced)
        sums = summed[:-1].view(2, groups)
        if slot is not None:  # gradient accumulation: the window's sums
            sums = state.window.pooled_gradients(sums, slot, not state.traced)
        grad_input = None
        if needs_input:
            means = sums / count
            # dx = gamma invstd g - invstd (mean(dxhat) + xhat mean(dxhat xhat)), per group:
            #    = g * scale + (x - mu) * slope + constant
            factor = scale if groups == channels else invstd
            coefficients = torch.addcmul(state.zero, means, factor, value=-1)
            coefficients[1].mul_(invstd)
            if groups != channels:
                coefficients = coefficients.repeat_interleave(channels // groups, dim=1)
            grad_input = kernels.scaled_grad_plus_affine(
                grad_output, scale, input, centre, coefficients[1], coefficients[0], state.ones
            )
        return (
            grad_input,
            grad_weight if needs_weight and weight is not None else None,
            grad_bias if needs_bias and weight is not None else None,
            None,
            None,
        )


class SyncBatchNorm(_BatchNorm):
    r"""Drop-in for ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` on inputs ``(N, C, *)``
    whose training statistics span every rank of ``process_group``.

    Same constructor, parameters, buffers and ``state_dict`` keys as ``nn.SyncBatchNorm``,
    so checkpoints load both ways. See the module docstring for the maths, guarantees and
    costs. ``process_group=None`` means the default (world) group.

    ``check_sync`` (attribute of the same name): check, inside each collective, that every
    rank of the group is in the same one; on by default (``None``), on every device.
    ``nonfinite`` (attribute of the same name): what a training batch with non-finite
    statistics does besides leaving the running statistics alone, on every rank: ``"warn"``
    (once per process), ``"raise"`` (:class:`~distnorm.errors.InputError`) or ``"skip"``
    (nothing). Both are reported by :mod:`distnorm.health`, at the latest at the first
    synchronized call of the next step. ``accumulation_steps`` (attribute of the same
    name): with k > 1, each training call is a micro-batch of an optimizer step of k, and
    is normalized with the statistics of the group's last k micro-batches; running
    statistics move once per step (:mod:`distnorm.layers.accumulation`).
    """

    # The input ranks accepted (None: any from 2); the 1d/2d/3d classes and layers
    # converted from torch's BatchNorm1d/2d/3d accept those classes' ranks only.
    input_dims: tuple[int, ...] | None = None

    # The attributes this layer holds besides a torch BatchNorm's: what
    # distnorm.revert_model drops to give a plain BatchNorm back (subclasses add theirs).
    _distnorm_attributes: ClassVar[tuple[str, ...]] = (
        "process_group",
        "_sync",
        "_sync_layer_id",
        "check_sync",
        "nonfinite",
        "accumulation_steps",
    )

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
        accumulation_steps: int = 1,
    ) -> None:
        # ``bias=False`` (an affine weight without a bias) exists from torch 2.13 on; it is
        # passed only when asked for, so that older torch keeps working.
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
            **({} if bias else {"bias": False}),
        )  # fmt: skip
        self._init_sync_state(process_group, check_sync, nonfinite, accumulation_steps)

    def _init_sync_state(
        self,
        process_group: comm.Group,
        check_sync: bool | None = None,
        nonfinite: str = "warn",
        accumulation_steps: int = 1,
    ) -> None:
        """Attributes a synchronized layer holds besides those of ``_BatchNorm``; also
        called by :func:`distnorm.convert_model` on modules it re-classes, once it has
        named them (the name is the layer's identity in the mismatch check)."""
        if nonfinite not in NONFINITE_POLICIES:
            raise InputError(
                f"{layer_label(self)}: nonfinite={nonfinite!r}; choose one of "
                f"{', '.join(NONFINITE_POLICIES)}"
            )
        steps = accumulation_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(
                f"{layer_label(self)}: accumulation_steps={steps!r}; give the number of "
                "micro-batches per optimizer step, a positive integer (1: no accumulation)"
            )
        self.accumulation_steps = steps
        if steps > 1:
            _ACCUMULATING.add(self)
        self.process_group = process_group
        self.check_sync = None if check_sync is None else bool(check_sync)
        self.nonfinite = nonfinite
        name = getattr(self, "_distnorm_name", None)
        key = name or f"{type(self).__name__}({self.num_features})#{next(_unnamed_layers)}"
        self._sync_layer_id = comm.layer_id(key)
        # Made on the first training call with peers, for its device, dtype and group.
        self._sync: _SyncState | None = None
        health.MONITOR.register(self)

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the state between calls behind (it is this layer's, on
        this device and group): a copy makes its own at its first training call. The
        process group travels as a :class:`comm.PortableGroup`: a copy in the same process
        shares the group, one elsewhere joins its sync group at its first training call."""
        state = self.__dict__.copy()
        state["_sync"] = None
        state["process_group"] = comm.portable(self.process_group)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.process_group = comm.restored(self.process_group)
        health.MONITOR.register(self)
        if self.accumulation_steps > 1:
            _ACCUMULATING.add(self)

    def _check_input_dim(self, input: Tensor) -> None:
        check_channels_input(self, input, self.num_features, self.input_dims)

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
        group = self._sync_group() if self.training else comm.LOCAL
        batch_stats = self.training or self.running_mean is None or self.running_var is None
        local = group is comm.LOCAL and _kernel_is_faster(input, groups)
        if not batch_stats or (local and not self._accumulates()):
            return self._local_batch_norm(input, weight, bias, groups)

        with kernels.full_precision(input):
            state = self._sync_state(input, groups, group)
            output, mean, var, count, ok = _SyncBatchNormFunction.apply(
                input, weight, bias, state, self.eps
            )
            self._after_synchronized_call(input, state, mean, var, count, ok)
        return output

    @torch.no_grad()
    def _after_synchronized_call(
        self, input: Tensor, state: _SyncState, mean: Tensor, var: Tensor, count: Tensor,
        ok: Tensor,
    ) -> None:  # fmt: skip
        """The shift and running statistics updated from a call's statistics, if ``ok``
        (with gradient accumulation: at a step's last micro-batch, from the step's)."""
        if not self.training or state.recomputing:  # nothing to update, or done already
            return
        assert state.shift is not None
        groups = state.groups
        torch.where(ok, mean, state.shift, out=state.shift)
        # Only a rank holding fewer than two values per statistic can belong to a group that
        # holds fewer than two in all, so only such a rank reads the global count on the host.
        group_batch_is_empty = False
        if input.numel() < 2 * groups:
            global_count = int(count.item())
            if global_count == 1:
                raise InputError(
                    f"{layer_label(self)} got 1 value per channel across its whole group "
                    f"({comm.describe_group(state.channel.group)}) in training mode; BatchNorm "
                    "needs at least 2: use a larger batch, a larger sync group, or a "
                    "normalization without batch statistics"
                )
            group_batch_is_empty = global_count == 0
        if self.track_running_stats:
            self._update_running_stats(mean, var, count, ok, group_batch_is_empty)

    def _sync_group(self) -> comm.Group:
        """Where this training call's collectives go: the layer's process group, or
        :data:`comm.LOCAL` when the group is this rank alone."""
        if isinstance(self.process_group, comm.PortableGroup):  # unpickled elsewhere
            self.process_group = comm.joined(self.process_group, layer_label(self))
        if comm.group_size(self.process_group) == 1:
            return comm.LOCAL
        return self.process_group

    def _sync_state(
        self, input: Tensor, groups: int, group: comm.Group, shifted: bool = True
    ) -> _SyncState:
        """The layer's state for this training call, made on the first call or when the
        device, dtype, grouping, group or accumulation changed (then, when ``shifted``, the
        shift agreed on with one more collective); the call announced to
        :mod:`distnorm.health`, unless it recomputes a forward (no announcement, no count)."""
        state = self._sync
        first = state is None or state.key != _SyncState.key_for(self, input, groups, group)
        if first:
            state = self._sync = _SyncState(self, input, groups, group)
        elif state.traced:
            state.traced = False
        assert state is not None
        compiling = torch.compiler.is_compiling()
        state.recomputing = recomputing()
        if not state.recomputing:
            if not compiling:
                state.calls += 1
            if state.window is not None:
                state.window.advance_host(compiling)
        if first and shifted:
            health.MONITOR.before_collective(state, "shift", state.calls, first=True)
            state.shift = self._agreed_shift(input, state)
        if not state.recomputing:
            health.MONITOR.before_collective(
                state, "forward", state.calls, first=first and not shifted
            )
        state.prepare(input)
        return state

    def _accumulates(self) -> bool:
        """Whether training calls pool statistics over micro-batches."""
        return self.training and self.accumulation_steps > 1

    def _mid_step(self) -> bool:
        """Whether training calls were made since the last step ended (or may have been:
        calls under torch.compile are not counted on the host)."""
        state = self._sync
        return state is not None and state.window is not None and state.window.host_phase != 0

    def _finish_partial_step(self) -> None:
        """Before an optimizer step: if fewer than k micro-batches were made since the
        last step ended, update the running statistics from them, and start a new step."""
        if not self._mid_step():
            return
        assert self._sync is not None and self._sync.window is not None
        with torch.no_grad():
            mean, var, count, ok = self._sync.window.finish()
            if self.track_running_stats:
                self._update_running_stats(mean, var, count, ok, False)

    def _agreed_shift(self, input: Tensor, state: _SyncState) -> Tensor:
        """The shift every rank holds, one per statistic: the global mean, from one
        collective of ``[sum(x), count]`` checked on the host at once. A non-finite mean
        becomes 0, as valid a shift, so that a NaN in the first batch reaches nothing."""
        groups = state.groups
        channel_mean, _ = kernels.channel_moments(input.detach(), state.scratch)
        count = input.numel() // input.size(1)
        parts = [
            channel_mean.view(groups, -1).sum(dim=1) * count,
            channel_mean.new_full((1,), input.numel() // groups),
        ]
        packed = state.channel.all_reduce_now(parts, "shift", state.calls)
        mean = packed[:-1] / packed[-1].clamp(min=1)
        return torch.nan_to_num(mean, nan=0.0, posinf=0.0, neginf=0.0)

    def _report_nonfinite(self) -> None:
        """Warn (once per process) or raise, as ``self.nonfinite`` says: called by
        :mod:`distnorm.health` when a training call's statistics were not finite."""
        if self.nonfinite == "raise":
            raise InputError(self._nonfinite_message())
        if self.nonfinite == "warn":
            health.warn_once("nonfinite", self._nonfinite_message())

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
        and its inference pass applies the per-channel affine."""
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
        again = self.training and recomputing()  # activation checkpointing, in backward
        tracked = self.num_batches_tracked
        if self.training and self.track_running_stats and tracked is not None:
            if not again:
                tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(tracked)
        # Batch statistics in training, and in eval when there are no running statistics.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Running statistics are read in eval and updated in training only when tracked.
        keep_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep_running else None
        running_var = self.running_var if keep_running else None
        if again and running_mean is not None and running_var is not None:
            # Copies to update and drop: the recomputation saves what the forward saved.
            running_mean, running_var = running_mean.clone(), running_var.clone()
        if groups == input.size(1):
            weight, bias = kernels.affine_for(weight, bias, running_mean)
            return F.batch_norm(
                input, running_mean, running_var, weight, bias, use_batch_stats, factor, self.eps
            )
        # A view when the input is contiguous, which _kernel_is_faster requires in training;
        # sizes given in full, so that an empty batch has a shape too.
        grouped = input.reshape(input.size(0), groups, math.prod(input.shape[1:]) // groups)
        normalized = F.batch_norm(
            grouped, running_mean, running_var, None, None, use_batch_stats, factor, self.eps
        ).view(input.shape)
        if weight is None and bias is None:
            return normalized
        parameter = weight if weight is not None else bias
        assert parameter is not None
        ones = torch.ones_like(parameter)
        scale = weight if weight is not None else ones
        return kernels.channel_affine(normalized, torch.zeros_like(parameter), scale, bias, ones)

    @torch.no_grad()
    def _update_running_stats(
        self, mean: Tensor, var: Tensor, count: Tensor, ok: Tensor, group_batch_is_empty: bool
    ) -> None:
        """``running = (1 - f) * running + f * batch`` with the unbiased global variance,
        ``f = momentum``, or ``1 / num_batches_tracked`` when momentum is None. An empty
        group batch counts as a batch but leaves the statistics alone, as in nn.BatchNorm;
        a batch that is not ``ok`` (mismatched or not finite) neither counts nor changes
        anything. Decided on the device: no host read."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(ok)
        if group_batch_is_empty:
            return
        factor: float | Tensor = self.momentum if self.momentum is not None else (
            self.num_batches_tracked.clamp(min=1).to(self.running_mean.dtype).reciprocal()
        )  # fmt: skip
        unbiased_var = var * (count / (count - 1))
        for running, batch in ((self.running_mean, mean), (self.running_var, unbiased_var)):
            # running + f * (batch - running); with batch := running, exactly running.
            running.lerp_(torch.where(ok, batch.to(running.dtype), running), factor)


# Layers that accumulate statistics over micro-batches: a partial step ends at the next
# step of an optimizer that updates the layer's parameters (any, for a layer without).
_ACCUMULATING: weakref.WeakSet[SyncBatchNorm] = weakref.WeakSet()


def _finish_partial_steps(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    partial = [layer for layer in list(_ACCUMULATING) if layer._mid_step()]
    if not partial:
        return
    updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in partial:
        owned = [id(p) for p in layer.parameters(recurse=False)]
        if not owned or any(p in updated for p in owned):
            layer._finish_partial_step()


register_optimizer_step_pre_hook(_finish_partial_steps)


class SyncBatchNorm1d(SyncBatchNorm, nn.BatchNorm1d):
    """:class:`SyncBatchNorm` that is an ``nn.BatchNorm1d`` (tools that find BatchNorms by
    type find it) and accepts its inputs only, ``(N, C)`` and ``(N, C, L)``."""

    input_dims = (2, 3)


class SyncBatchNorm2d(SyncBatchNorm, nn.BatchNorm2d):
    """:class:`SyncBatchNorm` that is an ``nn.BatchNorm2d``, for ``(N, C, H, W)`` inputs."""

    input_dims = (4,)


class SyncBatchNorm3d(SyncBatchNorm, nn.BatchNorm3d):
    """:class:`SyncBatchNorm` that is an ``nn.BatchNorm3d``, for ``(N, C, D, H, W)`` inputs."""

    input_dims = (5,)
