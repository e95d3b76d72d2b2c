"""distnorm's normalization layers: the maths, one concept per module."""

from distnorm.layers.batch_channel_norm import BatchChannelNorm
from distnorm.layers.batch_group_norm import BatchGroupNorm
from distnorm.layers.frozen_batchnorm import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
)
from distnorm.layers.group_norm import GroupNorm
from distnorm.layers.norm_act import NormAct, register_norm_act
from distnorm.layers.std_conv import WSConv1d, WSConv2d, WSConv3d
from distnorm.layers.sync_batchnorm import (
    SyncBatchNorm,
    SyncBatchNorm1d,
    SyncBatchNorm2d,
    SyncBatchNorm3d,
)

__all__ = [
    "BatchChannelNorm",
    "BatchGroupNorm",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GroupNorm",
    "NormAct",
    "SyncBatchNorm",
    "SyncBatchNorm1d",
    "SyncBatchNorm2d",
    "SyncBatchNorm3d",
    "WSConv1d",
    "WSConv2d",
    "WSConv3d",
    "register_norm_act",
]
