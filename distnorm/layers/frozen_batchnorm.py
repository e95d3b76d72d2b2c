"""FrozenBatchNorm: BatchNorm with fixed statistics and affine, for fine-tuning with tiny batches.

Maths: Ioffe & Szegedy (2015), "Batch Normalization", Algorithm 2 (the inference network):
with the population statistics E[x] and Var[x] fixed, BatchNorm is a per-channel affine map::

    y = gamma / sqrt(Var[x] + eps) * x + (beta - gamma * E[x] / sqrt(Var[x] + eps))

Why: a detector or segmenter fine-tuned at 1-2 images per GPU cannot estimate batch
statistics; keeping a BN-pretrained backbone's statistics *and* affine fixed is what
Detectron (Girshick et al. 2018) and detectron2's ``FrozenBatchNorm2d`` do, and what He et al.
("Rethinking ImageNet Pre-training", 2019, Sec. 3) describe as the fine-tuning baseline.

What it guarantees:

* The same output in train and eval mode: the eval-mode output of the BatchNorm it was
  converted from, bit for bit (it calls the same kernel with the same tensors).
* Nothing changes while training: no running-statistic update, ``num_batches_tracked``
  stays, and ``weight``/``bias`` receive no gradient (they are detached in ``forward``
  and marked ``requires_grad=False``, so DDP does not wait for their gradients).
* ``state_dict`` keys are BatchNorm's (``weight``, ``bias``, ``running_mean``,
  ``running_var``, ``num_batches_tracked``), so BN checkpoints load both ways.

What it costs: one fused multiply-add per element; no statistics, no communication.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from distnorm.errors import InputError, layer_label
from distnorm.layers import kernels
from distnorm.layers.inputs import check_channels_input


class FrozenBatchNorm(_BatchNorm):
    """Drop-in for ``nn.BatchNorm1d/2d/3d`` on inputs ``(N, C, *)`` that always normalizes
    with its running statistics and never changes; see the module docstring.

    Built from a trained BatchNorm by :func:`distnorm.convert_model` (``norm="frozen_bn"``)
    or constructed directly, then loaded from a BatchNorm checkpoint.
    """

    input_dims: tuple[int, ...] | None = None  # as SyncBatchNorm's
    _distnorm_attributes: ClassVar[tuple[str, ...]] = ()  # its state is a BatchNorm's

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # momentum is never used (nothing is updated); it is accepted so that the
        # constructor is BatchNorm's and BatchNorm-building code can build this instead.
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self._freeze()

    def _freeze(self) -> None:
        """Stop gradients to the affine; also called by convert on re-classed BatchNorms."""
        if self.running_mean is None or self.running_var is None:
            raise InputError(
                f"{layer_label(self)} has no running statistics (track_running_stats=False), "
                "so there is nothing to freeze; keep BatchNorm or choose a normalization "
                "without batch statistics for it"
            )
        for parameter in (self.weight, self.bias):
            if parameter is not None:
                parameter.requires_grad_(False)

    def _check_input_dim(self, input: Tensor) -> None:
        check_channels_input(self, input, self.num_features, self.input_dims)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        weight = None if self.weight is None else self.weight.detach()
        bias = None if self.bias is None else self.bias.detach()
        weight, bias = kernels.affine_for(weight, bias, self.running_mean)
        # y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta, with the running statistics
        # as E[x] and Var[x] whatever the mode: BatchNorm's inference transform.
        return F.batch_norm(
            input, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps
        )


class FrozenBatchNorm1d(FrozenBatchNorm, nn.BatchNorm1d):
    """:class:`FrozenBatchNorm` that is an ``nn.BatchNorm1d`` (tools that find BatchNorms by
    type find it) and accepts its inputs only, ``(N, C)`` and ``(N, C, L)``."""

    input_dims = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm, nn.BatchNorm2d):
    """:class:`FrozenBatchNorm` that is an ``nn.BatchNorm2d``, for ``(N, C, H, W)`` inputs."""

    input_dims = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm, nn.BatchNorm3d):
    """:class:`FrozenBatchNorm` that is an ``nn.BatchNorm3d``, for ``(N, C, D, H, W)`` inputs."""

    input_dims = (5,)
