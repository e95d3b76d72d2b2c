"""Batch Group Normalization: BatchNorm statistics pooled over groups of channels, synchronized.

Maths: Zhou et al. (2020), "Batch Group Normalization", arXiv:2012.02782. The input
``(N, C, *)`` is viewed as ``(N, G, S)`` with ``S = C/G * prod(*)``, and each group ``g`` is
normalized with the mean and variance of all its ``N * S`` values (every sample, the group's
``C/G`` channels, every position), then re-scaled and re-shifted per *channel*::

    mu_g      = 1/(N S) * sum_{n,s} x_{n,g,s}
    sigma_g^2 = 1/(N S) * sum_{n,s} (x_{n,g,s} - mu_g)^2
    y_{n,c,p} = gamma_c * (x_{n,c,p} - mu_g) / sqrt(sigma_g^2 + eps) + beta_c,   g = c // (C/G)

which is BatchNorm's transform (Ioffe & Szegedy 2015, Algorithm 1) over larger sets.

Why: a channel's ``N * prod(*)`` values give noisy statistics when the batch is small; pooling
``C/G`` channels multiplies that count without adding a parameter. G is the paper's knob for
"the number of feature instances used for statistic calculation" (abstract): ``G = C`` is
BatchNorm exactly, ``G = 1`` normalizes over everything in the batch.

Groups and the default G. Groups are made of whole consecutive channels, so G must divide C:
then the running statistics are per group of channels, independent of the input's spatial
size, and expand to per-channel ones (see below). The default ``num_groups=None`` takes the
grouping BGN borrows from Group Normalization ("the group technique in GN is used",
abstract): GN's 32 groups, reduced to a divisor of C with at least two channels per group
(:func:`distnorm.layers.group_norm.choose_num_groups`), so that the default never silently
degenerates to plain BatchNorm (``G = C``). The paper tunes G with the batch size; pass it
explicitly to follow a particular setting.

What it guarantees: it is :class:`SyncBatchNorm`'s core with one statistic per group instead
of per channel (the same autograd Function, whose backward sums the gradient terms over each
group's channels before its collective), so everything SyncBatchNorm guarantees holds per
group. Statistics of the concatenated batch of every rank in ``process_group``, exactly, for
uneven and empty per-rank batches; a shifted-data variance that stays accurate when
``|mean| >> std``; fp32 statistics and communication for fp16/bf16 inputs (fp64 for fp64);
running statistics updated as ``nn.BatchNorm`` updates them (momentum, unbiased over the
global count, cumulative when ``momentum=None``); mismatched calls across ranks caught
(``check_sync``) and non-finite batches kept out of the running statistics
(``nonfinite``), as SyncBatchNorm does. Each rank's weight and bias gradients are its own
share, which DDP sums like any parameter's. The output has the input's dtype and memory
format, computed in one kernel pass with the group statistics spread over the channels and
the per-channel affine folded in.

In one process (no peers) the statistics are the same, computed one of two ways, whichever
is faster for the input (:func:`distnorm.layers.sync_batchnorm._kernel_is_faster`): for
contiguous inputs of up to 4M values, torch's BatchNorm kernel on the input viewed as
``(N, G, C/G * prod(*))``, whose channels are the groups, then the kernel's inference pass
for the per-channel affine; for larger or channels-last inputs, the synchronized path
above over this process alone. The first has torch's semantics for a non-finite batch (the
running statistics take it, as ``nn.BatchNorm``'s do, and ``nonfinite`` does not apply, as
for SyncBatchNorm without peers); the second keeps the batch out and reports it.

Running statistics are one mean and variance per group, stored under BatchNorm's keys
(``running_mean``/``running_var`` hold G values, ``weight``/``bias`` C). In eval the layer
normalizes with them expanded to channels, :meth:`BatchGroupNorm.channel_running_stats`,
through torch's own BatchNorm kernel: a plain ``nn.BatchNorm`` holding the expanded
statistics gives the same eval output bit for bit, which is how a trained BatchGroupNorm is
exported. Converting a trained BatchNorm the other way (:meth:`_init_group_state`) starts
each group from its channels' statistics: the mean of their means, and by the law of total
variance the mean of their variances plus the (population) variance of their means.

What it costs: one all-reduce each way, of ``2G + 1`` values forward and ``2G`` backward
(plus ``G + 1`` once, on a layer's first training call, to agree on the shift), whatever
the world size: less than SyncBatchNorm's ``2C + 1`` and ``2C`` for the same layer. The
mismatch check (on by default) pads each to ``2G + 1`` values and adds its 9-value tag.
The passes over the data are SyncBatchNorm's, those of torch's own BatchNorm kernels, in
any memory format, plus a few dozen operations on C-sized vectors per call, a fixed cost
of some 0.4 ms on CPU that dominates small inputs. In one process, small contiguous inputs
avoid that cost with two passes more (torch's kernel twice each way); the layer-overhead
benchmark has the figures. In eval it is one pass of torch's kernel and no communication;
with ``G = C`` it *is* SyncBatchNorm, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distnorm import comm
from distnorm.errors import InputError, layer_label
from distnorm.layers.group_norm import check_num_groups, choose_num_groups
from distnorm.layers.sync_batchnorm import SyncBatchNorm


class BatchGroupNorm(SyncBatchNorm):
    r"""Batch Group Normalization of inputs ``(N, C, *)`` over groups of ``C / num_groups``
    channels, with statistics spanning every rank of ``process_group``.

    ``num_groups`` must divide ``num_features``; ``None`` picks GroupNorm's default grouping
    (see the module docstring). ``num_groups = num_features`` is SyncBatchNorm. Parameters
    and ``state_dict`` keys are BatchNorm's; the running statistics hold one value per group.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = None,
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
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, process_group,
            device, dtype, bias=bias, check_sync=check_sync, nonfinite=nonfinite,
        )  # fmt: skip
        self._init_group_state(num_groups)

    def _init_group_state(self, num_groups: int | None) -> None:
        """Set the grouping and resize the running statistics to one value per group; also
        called by :func:`distnorm.convert_model` on a BatchNorm it re-classes.

        Running statistics of C channels (a trained BatchNorm's) become those of the groups:
        ``mean_g = mean_c(mean_c)`` and ``var_g = mean_c(var_c) + var_c(mean_c)`` over the
        group's channels, the law of total variance for equally weighted channels. It is exact
        for the distribution the channel statistics describe, and for the unbiased variance of
        the group's own values up to a relative O(1/count). The new tensors replace the
        buffers in this module only: a module whose state was copied keeps its own.
        """
        groups = self._checked_num_groups(num_groups)
        channel_stats = self.channel_running_stats()
        self.num_groups = groups
        # The shift is a per-group mean: one of another grouping means nothing here.
        self._sync = None
        if channel_stats is None or self.running_mean.numel() == groups:
            return
        channel_mean, channel_var = (stat.view(groups, -1) for stat in channel_stats)
        self.running_mean = channel_mean.mean(dim=1)
        self.running_var = channel_var.mean(dim=1) + channel_mean.var(dim=1, unbiased=False)

    def _checked_num_groups(self, num_groups: int | None) -> int:
        channels = self.num_features
        if num_groups is None:
            try:
                return choose_num_groups(channels, layer=layer_label(self))
            except InputError:
                divisors = [d for d in range(1, channels + 1) if channels % d == 0]
                raise InputError(
                    f"{layer_label(self)} has {channels} channels, which have no default "
                    "grouping (up to 32 groups of at least 2 channels each); pass num_groups "
                    f"explicitly, one of {divisors} ({channels} is plain BatchNorm, 1 pools "
                    "all channels)"
                ) from None
        return check_num_groups(channels, num_groups, layer=layer_label(self))

    def channel_running_stats(self) -> tuple[Tensor, Tensor] | None:
        """Per-channel running mean and variance: each group's, repeated for its channels
        (None without running statistics). An ``nn.BatchNorm`` holding these and this
        layer's weight and bias has this layer's eval output, bit for bit."""
        if self.running_mean is None or self.running_var is None:
            return None
        repeats = self.num_features // self.running_mean.numel()
        return (
            self.running_mean.repeat_interleave(repeats),
            self.running_var.repeat_interleave(repeats),
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        channel_stats = None if self.training else self.channel_running_stats()
        if channel_stats is not None:
            # Eval: torch's BatchNorm kernel with the expanded statistics, exactly what the
            # exported nn.BatchNorm computes, in one pass and in the input's memory format.
            return F.batch_norm(input, *channel_stats, self.weight, self.bias, False, 0.0, self.eps)
        return self._batch_norm(input, self.weight, self.bias, self.num_groups)

    def extra_repr(self) -> str:
        features, rest = super().extra_repr().split(", ", 1)
        return f"{features}, num_groups={self.num_groups}, {rest}"
