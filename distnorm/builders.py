"""Norm factories for model builders: distnorm's policy behind a ``norm_layer=`` argument.

torchvision's ResNet family, timm's ResNets and detectron2's ``get_norm`` build their
normalization layers by calling ``norm_layer(num_channels)``. :func:`norm_layer` returns
such a callable (a plain function, as timm's ``get_norm_layer`` requires): each call builds
the BatchNorm the constructor asked for and converts it as :func:`distnorm.convert_model`
would (the policy for that layer, or ``norm=``), so the model is born converted.

A factory never sees the convolutions, so the Weight Standardization that GN+WS, BCN and
BGN pair with is applied afterwards by :func:`distnorm.standardize_weights(model)`
(a warning says so when the factory built such a layer). Layers built before
``init_process_group`` join their sync groups at their first training call. The layers of
one factory are told apart in the sync check by their construction order, the same on
every rank when every rank builds the same model.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from distnorm import comm
from distnorm.convert import LayerTarget, convert_layer, plan_targets
from distnorm.errors import ConversionError
from distnorm.logs import get_logger
from distnorm.norms import pairs_with_ws
from distnorm.policy.planner import decide

logger = get_logger(__name__)

_BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def norm_layer(
    per_worker_batch_size: int | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    norm: str | None = None,
    dims: int = 2,
    num_groups: int | None = None,
    process_group: comm.Group = None,
    check_sync: bool | None = None,
    **plan_options: Any,
) -> Callable[..., nn.Module]:
    """A ``norm_layer(num_features, eps=, momentum=, affine=, track_running_stats=,
    device=, dtype=)`` function building, for each call, a ``BatchNorm{dims}d`` converted
    as :func:`distnorm.convert_model` would with the same arguments: by the policy for
    ``per_worker_batch_size`` (``plan_options``: ``policy``, ``pretrained``,
    ``world_size``, ``ranks_per_node``), or to ``norm`` (over ``process_group``, with
    ``num_groups``), or SyncBatchNorm when neither is given."""
    if dims not in _BATCHNORMS:
        raise ConversionError(f"distnorm.norm_layer(dims={dims!r}): dims must be 1, 2 or 3")
    planned = per_worker_batch_size is not None
    if planned and (norm is not None or process_group is not None or num_groups is not None):
        raise ConversionError(
            "distnorm.norm_layer got a per-worker batch size with norm=, process_group= or "
            "num_groups=; give the batch size to let the policy decide, or force the norm"
        )
    if plan_options and not planned:
        raise ConversionError(
            f"distnorm.norm_layer got planning options {sorted(plan_options)} without "
            "per_worker_batch_size=...; they only apply when the policy decides"
        )
    forced = LayerTarget(norm or "sync_bn", process_group, num_groups)
    built = itertools.count()
    logged: set[tuple[str, int | None]] = set()  # decisions logged so far
    warned = False  # about Weight Standardization

    def make(
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **unexpected: Any,
    ) -> nn.Module:
        nonlocal warned
        if unexpected:
            raise TypeError(
                f"distnorm.norm_layer(...)({num_features}, ...) got {sorted(unexpected)}: "
                "it builds BatchNorms from BatchNorm's arguments. Norm-act builders (timm's "
                "EfficientNet, MobileNet, RegNet pass act_layer=) take no factory: build "
                "the model with its own layers and call distnorm.convert_model on it"
            )
        name = f"norm_layer{next(built)}"
        layer = _BATCHNORMS[dims](
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        target = forced
        if planned:
            plan = decide(nn.ModuleDict({name: layer}), per_worker_batch_size, **plan_options)[0]
            target = plan_targets(plan, comm.sync_group_when_joined)(name, layer)
            decision = plan.layers[0]
            if (decision.norm, decision.sync_group_size) not in logged:
                logged.add((decision.norm, decision.sync_group_size))
                logger.info("distnorm.norm_layer: %s -> %s", name, decision.reason)
        if pairs_with_ws(target.norm, target.accumulation_steps) and not warned:
            warned = True
            logger.warning(
                "distnorm.norm_layer built %s layers, which pair with Weight Standardization "
                "of the convolutions feeding them: call distnorm.standardize_weights(model) "
                "once the model is built",
                target.norm,
            )
        return convert_layer(name, layer, target, check_sync) or layer

    return make
