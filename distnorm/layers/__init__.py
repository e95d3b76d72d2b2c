"""distnorm's normalization layers: the maths, one concept per module."""

from distnorm.layers.batch_channel_norm import BatchChannelNorm
from distnorm.layers.batch_group_norm import BatchGroupNorm
from distnorm.layers.frozen_batchnorm import FrozenBatchNorm
from distnorm.layers.std_conv import WSConv1d, WSConv2d, WSConv3d
from distnorm.layers.sync_batchnorm import SyncBatchNorm

__all__ = [
    "BatchChannelNorm",
    "BatchGroupNorm",
    "FrozenBatchNorm",
    "SyncBatchNorm",
    "WSConv1d",
    "WSConv2d",
    "WSConv3d",
]
