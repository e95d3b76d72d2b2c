"""The public conversion API: swap a model's normalization layers for distnorm's, and back.

``convert_model`` replaces each BatchNorm with the normalization asked for: ``norm=``
forces one for the whole model (a name of :data:`distnorm.NORMS`); a per-worker batch size
(or a saved plan) lets the policy decide per layer; without either every BatchNorm becomes
a :class:`~distnorm.layers.SyncBatchNorm`. ``revert_model`` gives back plain torch modules
with identical eval outputs, for export; ``standardize_weights`` adds the Weight
Standardization a norm factory (:func:`distnorm.norm_layer`) could not.

How a module is replaced is :mod:`distnorm.surgery`; what was replaced,
:mod:`distnorm.report`. Their names used by earlier code stay importable from here.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from distnorm import comm
from distnorm.errors import ConversionError
from distnorm.logs import get_logger
from distnorm.norms import NORMS, norm_of, pairs_with_ws
from distnorm.policy import Plan
from distnorm.policy import plan as make_plan
from distnorm.report import (
    UNCONVERTED_NORMS,
    ConversionReport,
    ConversionRow,
    conversion_report,
)
from distnorm.surgery import (
    LayerTarget,
    _new_layer,  # pickles of converted models name these two here
    _new_synchronized,
    convert_layer,
    feeding_convs,
    replace_modules,
    revert_layer,
    standardized_conv,
    where,
)
from distnorm.world import world_layout

logger = get_logger(__name__)

# The normalizations convert_model(norm=...) can put in every BatchNorm's place.
FORCEABLE_NORMS = tuple(name for name, norm in NORMS.items() if norm.forceable)


# Normalizations whose feeding convolutions get Weight Standardization by default.
WS_NORMS = frozenset(name for name, norm in NORMS.items() if norm.ws_default)


def convert_model(
    model: nn.Module,
    per_worker_batch_size: int | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    norm: str | None = None,
    plan: Plan | None = None,
    process_group: comm.Group = None,
    num_groups: int | None = None,
    weight_standardization: bool | None = None,
    check_sync: bool | None = None,
    accumulation_steps: int | None = None,
    **plan_options: Any,
) -> nn.Module:
    """Replace the BatchNorms of ``model`` with distributed-aware normalizations and return
    the converted model. Three ways to say which:

    * ``per_worker_batch_size`` (an int, or a DeepSpeed / Accelerate config to read it
      from): the policy engine decides per layer, :func:`distnorm.plan` with
      ``plan_options`` (``policy``, ``pretrained``, ``sample_input``, ``world_size``,
      ``ranks_per_node``), and this applies the plan; ``plan=`` replays a saved one.
      The sync groups the plan needs are created here, once, on every rank: convert
      after ``init_process_group``, on every rank.
    * ``norm``: one normalization for every BatchNorm, one of ``"bn"``, ``"sync_bn"``
      (over ``process_group``, default the world), ``"gn_ws"``, ``"bcn"``, ``"bgn"``,
      ``"frozen_bn"``. ``num_groups`` fixes G for the grouped ones (it must divide every
      converted layer's channels; by default GroupNorm's 32, reduced to a divisor).
    * neither: every BatchNorm becomes a :class:`SyncBatchNorm` over ``process_group``.

    ``accumulation_steps`` (gradient accumulation: micro-batches per optimizer step) goes
    to the plan (default: the config's, when ``per_worker_batch_size`` is one, else 1),
    which may pool a SyncBatchNorm's statistics over them; with ``norm="sync_bn"`` (or no
    norm) every SyncBatchNorm normalizes each micro-batch with statistics pooled over the
    last ``accumulation_steps`` micro-batches of its group and updates its running
    statistics once per optimizer step. Other forced norms take no ``accumulation_steps``.

    ``weight_standardization`` standardizes the convolutions feeding the converted layers:
    by default (None) those feeding ``"gn_ws"``, ``"bcn"`` and ``"bgn"`` layers (the
    pairings of Qiao et al.; BGN underfits without it) and SyncBatchNorms that accumulate
    (``accumulation_steps`` > 1; they too underfit without it); ``True`` those feeding any layer
    with batch or group statistics (also ``"bn"`` and ``"sync_bn"``; refused for a forced
    ``"frozen_bn"``, whose statistics were measured on the plain convolution's outputs);
    ``False`` none. ``check_sync``
    (default: on, every device) makes every synchronized layer check, on the device inside
    each collective, that all ranks are in the same layer and direction; a mismatch leaves
    the statistics alone and raises :class:`~distnorm.SyncMismatchError` on every rank at
    the next report (:mod:`distnorm.health`); ``False`` saves the tag's 40 values.

    The model is changed in place, but a BatchNorm at the root is replaced, so always use
    the return value. Convert *before* wrapping the model in DDP, Accelerate or DeepSpeed.
    Converting an already converted model to the same norm changes nothing. A model
    without BatchNorm layers is returned unchanged, with a warning.
    ``conversion_report(model)`` lists what was replaced; it is also logged (rank 0, INFO).
    """
    planned = per_worker_batch_size is not None or plan is not None
    if norm is not None and planned:
        raise ConversionError(
            "convert_model got both norm= and a per-worker batch size or plan; give norm= to "
            "force one normalization everywhere, or let the plan decide (its policy's "
            "overrides can force a norm for some layers)"
        )
    if planned and process_group is not None:
        raise ConversionError(
            "convert_model got a process_group with a per-worker batch size or plan: a plan "
            "forms its sync groups from consecutive ranks of the whole world and cannot "
            "honour a base group (the data-parallel group under model parallelism). Force "
            "the norm over that group instead: convert_model(model, norm='sync_bn', "
            "process_group=distnorm.distributed.data_parallel_group(mpu))"
        )
    if plan_options and not planned:
        raise ConversionError(
            f"convert_model got planning options {sorted(plan_options)} without "
            "per_worker_batch_size=...; they only apply when the policy engine plans"
        )
    if planned:
        if plan is None:
            plan = make_plan(
                model, per_worker_batch_size, accumulation_steps=accumulation_steps, **plan_options
            )
        elif accumulation_steps is not None and accumulation_steps != plan.accumulation_steps:
            raise ConversionError(
                f"convert_model got accumulation_steps={accumulation_steps} with a plan made "
                f"for {plan.accumulation_steps}; plan again with accumulation_steps="
                f"{accumulation_steps}, or leave it out to replay the plan as it is"
            )
        return apply_targets(
            model,
            plan_targets(plan),
            weight_standardization=_ws_rule(weight_standardization),
            check_sync=check_sync,
        )

    norm = "sync_bn" if norm is None else norm
    if norm not in FORCEABLE_NORMS:
        raise ConversionError(
            f"convert_model(norm={norm!r}): unknown normalization; choose one of "
            f"{', '.join(FORCEABLE_NORMS)}"
        )
    if weight_standardization and not NORMS[norm].ws_allowed:
        raise ConversionError(
            f"convert_model(norm={norm!r}, weight_standardization=True): a frozen "
            "BatchNorm's statistics were measured on the plain convolutions' outputs, which "
            "standardizing their weights would change; leave weight_standardization out, or "
            "choose a norm that learns its statistics (gn_ws, bcn, bgn, sync_bn, bn)"
        )
    steps = 1 if accumulation_steps is None else accumulation_steps
    target = LayerTarget(norm, process_group, num_groups, steps)
    return apply_targets(
        model,
        lambda name, module: target,
        weight_standardization=_ws_rule(weight_standardization),
        check_sync=check_sync,
    )


def plan_targets(
    plan: Plan, make_group: Callable[[int], Any] = comm.sync_group
) -> Callable[[str, _BatchNorm], LayerTarget]:
    """Each layer's target under ``plan``, with the plan's sync groups made up front by
    ``make_group`` (in the plan's order, on every rank, as torch requires)."""
    live_world = world_layout().world_size
    if plan.world_size != live_world:
        raise ConversionError(
            f"the plan was made for a world of {plan.world_size} ranks but this job has "
            f"{live_world}; plan again for this world (distnorm.plan(...)) or convert with "
            "per_worker_batch_size=... to plan and convert in one step"
        )
    groups = {size: make_group(size) for size in plan.sync_group_sizes}
    decisions = {layer.name: layer for layer in plan.layers}

    def target_of(name: str, module: _BatchNorm) -> LayerTarget:
        decision = decisions.get(name)
        if decision is None:
            raise ConversionError(
                f"{where(name, module)} has no entry in the plan; the plan was made for "
                "another model (plan this model, or convert before renaming modules)"
            )
        # Synchronized layers the plan keeps local get a group of their own rank alone.
        group = groups[decision.sync_group_size] if decision.sync_group_size else comm.LOCAL
        return LayerTarget(decision.norm, group, decision.num_groups, decision.accumulation_steps)

    return target_of


def apply_targets(
    model: nn.Module,
    target_of: Callable[[str, _BatchNorm], LayerTarget],
    *,
    weight_standardization: Callable[[LayerTarget], bool],
    check_sync: bool | None = None,
) -> nn.Module:
    """Convert each BatchNorm of ``model`` to ``target_of(qualified_name, module)``, and
    standardize the convolutions that feed a layer whose target ``weight_standardization``
    accepts; synchronized layers get ``check_sync``. The engine under
    :func:`convert_model`."""
    if isinstance(model, DistributedDataParallel):
        raise ConversionError(
            "convert_model got a DistributedDataParallel wrapper; convert the model first "
            "and wrap it afterwards: DDP(distnorm.convert_model(model))"
        )
    targets = {
        name: target_of(name, module)
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm)
    }
    if not targets and not any(hasattr(m, "_distnorm_origin") for m in model.modules()):
        warnings.warn(
            f"distnorm.convert_model: {type(model).__name__} has no BatchNorm layers, so "
            "nothing was converted; distnorm converts BatchNorm (other normalizations are "
            "left alone)",
            UserWarning,
            stacklevel=3,
        )
    standardize: set[str] = set()
    if any(map(weight_standardization, targets.values())):
        standardize = feeding_convs(
            model, (_BatchNorm,), lambda name: weight_standardization(targets[name])
        )

    def convert(name: str, module: nn.Module) -> nn.Module | None:
        if name in standardize:
            return standardized_conv(name, module)
        if name in targets and isinstance(module, _BatchNorm):
            return convert_layer(name, module, targets[name], check_sync)
        return None

    converted = replace_modules(model, convert)
    if logger.isEnabledFor(logging.INFO):  # the report walks the model again: only if shown
        logger.info("distnorm.convert_model:\n%s", conversion_report(converted))
    return converted


def standardize_weights(model: nn.Module) -> nn.Module:
    """Give Weight Standardization to the convolutions of ``model`` that feed distnorm
    layers it pairs with (:func:`pairs_with_ws`), as
    :func:`convert_model` does: for models built with :func:`distnorm.norm_layer`, whose
    norm factory never sees the convolutions. Returns the model (in place)."""
    layers = tuple(norm.layer for norm in NORMS.values() if norm.layer is not None)

    def wanted(name: str) -> bool:
        layer = model.get_submodule(name)
        return pairs_with_ws(norm_of(layer), getattr(layer, "accumulation_steps", 1))

    standardize = feeding_convs(model, layers, wanted)
    return replace_modules(
        model, lambda name, module: standardized_conv(name, module) if name in standardize else None
    )


def _ws_rule(weight_standardization: bool | None) -> Callable[[LayerTarget], bool]:
    """Which targets get Weight Standardization for ``weight_standardization`` (None: the
    default pairings)."""
    if weight_standardization is None:
        return lambda target: pairs_with_ws(target.norm, target.accumulation_steps)
    if weight_standardization:
        return lambda target: NORMS[target.norm].ws_allowed
    return lambda target: False


def revert_model(model: nn.Module) -> nn.Module:
    """Give every distnorm layer in ``model`` plain torch modules again, with identical
    eval outputs, for export: SyncBN, FrozenBN and BGN become their original BatchNorm
    class (a directly constructed one ``nn.BatchNorm2d``; BGN's group statistics spread
    over their channels), BCN becomes ``Sequential(BatchNorm, GroupNorm)``, a
    weight-standardized convolution a plain one holding the standardized weight, and a
    GroupNorm converted from BatchNorm stays a GroupNorm. SyncBN and FrozenBN share their
    parameters and buffers with the reverted module; FrozenBN's affine is trainable again.
    In place except at the root; use the return value.
    """
    return replace_modules(model, revert_layer)


__all__ = [
    "FORCEABLE_NORMS",
    "UNCONVERTED_NORMS",
    "WS_NORMS",
    "ConversionReport",
    "ConversionRow",
    "LayerTarget",
    "_new_layer",
    "_new_synchronized",
    "apply_targets",
    "conversion_report",
    "convert_layer",
    "convert_model",
    "pairs_with_ws",
    "plan_targets",
    "revert_model",
    "standardize_weights",
]
