"""Batch Group Normalization: BatchNorm statistics pooled over groups of channels, synchronized.

Maths: Zhou et al. (2020), "Batch Group Normalization", arXiv:2012.02782. The input
``(N, C, *)`` is viewed as ``(N, G, S)``, ``S = C/G * prod(*)``; each group is normalized
with the mean and variance of its ``N * S`` values, then re-scaled per *channel*::

    y_{n,c,p} = gamma_c * (x_{n,c,p} - mu_g) / sqrt(sigma_g^2 + eps) + beta_c,   g = c // (C/G)

BatchNorm's transform (Ioffe & Szegedy 2015, Algorithm 1) over larger sets: ``G = C`` is
BatchNorm, ``G = 1`` pools every channel. Groups are whole consecutive channels (G divides
C); the default ``num_groups=None`` is GroupNorm's 32 reduced to a divisor of C with at
least two channels per group (:func:`~distnorm.layers.group_norm.choose_num_groups`).

Guarantees: it is :class:`SyncBatchNorm`'s core with one statistic per group, so all of
SyncBatchNorm's guarantees hold per group (exact statistics of the group's concatenated
batch for uneven and empty batches, shifted sums, fp32 statistics for half inputs,
device-side mismatch and non-finite checks). Running statistics hold G values under
BatchNorm's keys; in eval the layer is torch's BatchNorm with them expanded to channels
(:meth:`BatchGroupNorm.channel_running_stats`), which is how it is exported. In one process,
contiguous inputs of up to 4M values take torch's kernel on the ``(N, G, S)`` view instead
(torch's NaN semantics there, as SyncBatchNorm without peers).

Cost: one all-reduce each way of ``2G + 1`` values (and the tag), whatever the world size;
SyncBatchNorm's passes over the data, and a published number of operations on C-sized
vectors (``benchmarks/dispatch.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from distnorm import comm
from distnorm.errors import InputError, layer_label
from distnorm.layers import kernels
from distnorm.layers.group_norm import check_num_groups, choose_num_groups
from distnorm.layers.sync_batchnorm import SyncBatchNorm


class BatchGroupNorm(SyncBatchNorm):
    r"""Batch Group Normalization of inputs ``(N, C, *)`` over groups of ``C / num_groups``
    channels, with statistics spanning every rank of ``process_group``.

    ``num_groups`` must divide ``num_features``; ``None`` picks GroupNorm's default grouping
    (see the module docstring). ``num_groups = num_features`` is SyncBatchNorm. Parameters
    and ``state_dict`` keys are BatchNorm's; the running statistics hold one value per group.
    """

    _distnorm_attributes: ClassVar[tuple[str, ...]] = (
        *SyncBatchNorm._distnorm_attributes,
        "num_groups",
    )

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
            weight, bias = kernels.affine_for(self.weight, self.bias, channel_stats[0])
            return F.batch_norm(input, *channel_stats, weight, bias, False, 0.0, self.eps)
        return self._batch_norm(input, self.weight, self.bias, self.num_groups)

    def extra_repr(self) -> str:
        features, rest = super().extra_repr().split(", ", 1)
        return f"{features}, num_groups={self.num_groups}, {rest}"
