"""How many groups a group-wise normalization of C channels gets.

Wu & He (2018), "Group Normalization", ECCV, Eq. (1)-(3) and Sec. 3.1: GN computes the
mean and variance of each sample over a set S_i of C/G channels (and all spatial
positions), ``S_i = {k | k_N = i_N, floor(k_C / (C/G)) = floor(i_C / (C/G))}``; the paper's
default is G = 32 groups, and its Table 3 shows 16 channels per group working as well.
G = 1 is LayerNorm and C/G = 1 is InstanceNorm, both clearly worse in that table, so
a grouping that degenerates to either is not accepted silently.

Used for GroupNorm converted from BatchNorm and for the channel part of Batch-Channel
Normalization (Qiao et al.), which groups channels the same way. The maths is
``torch.nn.GroupNorm``'s kernel, which computes Eq. (1)-(3) already; :class:`GroupNorm`
adds the input check of the BatchNorm it replaced.
"""

from __future__ import annotations

from torch import Tensor, nn

from distnorm.errors import InputError
from distnorm.layers.inputs import check_channels_input

DEFAULT_NUM_GROUPS = 32
DEFAULT_MIN_CHANNELS_PER_GROUP = 2


def choose_num_groups(
    num_channels: int,
    preferred: int = DEFAULT_NUM_GROUPS,
    min_channels_per_group: int = DEFAULT_MIN_CHANNELS_PER_GROUP,
    *,
    layer: str = "layer",
) -> int:
    """The largest divisor G of ``num_channels`` with ``G <= preferred`` and at least
    ``min_channels_per_group`` channels per group, and G >= 2.

    ``preferred`` itself when it divides C with enough channels per group (C=256 -> 32,
    C=64 -> 32); otherwise the next smaller divisor (C=48 -> 24, C=40 -> 20). Raises
    :class:`InputError` naming ``layer`` when no such G exists (C=3, or a prime C like
    37): only LayerNorm (G=1) or InstanceNorm (G=C) would fit, and those must be asked
    for explicitly.
    """
    if num_channels < 1 or preferred < 1 or min_channels_per_group < 1:
        raise InputError(
            f"{layer}: num_channels ({num_channels}), preferred groups ({preferred}) and "
            f"min_channels_per_group ({min_channels_per_group}) must all be positive"
        )
    for groups in range(min(preferred, num_channels), 1, -1):
        if num_channels % groups == 0 and num_channels // groups >= min_channels_per_group:
            return groups
    raise InputError(
        f"{layer} has {num_channels} channels, which cannot be split into 2 to {preferred} "
        f"groups of at least {min_channels_per_group} channels each; give this layer an "
        "explicit num_groups (1 for LayerNorm-like, C for InstanceNorm-like statistics), "
        "override its normalization, or keep BatchNorm for it"
    )


def check_num_groups(num_channels: int, num_groups: int, *, layer: str = "layer") -> int:
    """``num_groups`` when it splits ``num_channels`` into groups of whole channels; else
    :class:`InputError` naming ``layer`` and listing the numbers that would."""
    if num_groups < 1 or num_channels % num_groups:
        divisors = [d for d in range(1, num_channels + 1) if num_channels % d == 0]
        raise InputError(
            f"{layer} has {num_channels} channels, which num_groups={num_groups} does not "
            f"divide into groups of whole channels; num_groups must be one of {divisors}"
        )
    return num_groups


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` in a converted BatchNorm's place: refuses, with :class:`InputError`
    naming it, inputs the BatchNorm refused (``input_dims``: the accepted ranks, None for
    any from 2). :func:`distnorm.revert_model` makes it a plain ``nn.GroupNorm`` again."""

    input_dims: tuple[int, ...] | None = None

    def forward(self, input: Tensor) -> Tensor:
        check_channels_input(self, input, self.num_channels, self.input_dims)
        return super().forward(input)
