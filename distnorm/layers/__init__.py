"""distnorm's normalization layers: the maths, one concept per module."""

from distnorm.layers.sync_batchnorm import SyncBatchNorm

__all__ = ["SyncBatchNorm"]
