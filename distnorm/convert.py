"""Module surgery: swap a model's normalization layers for distnorm's, and back.

``convert_model`` walks the module tree and replaces each BatchNorm with the normalization
asked for: ``norm=`` forces one for the whole model (``"bn"``, ``"sync_bn"``, ``"gn_ws"``,
``"bcn"``, ``"bgn"``, ``"frozen_bn"``); without it every BatchNorm becomes a
:class:`~distnorm.layers.SyncBatchNorm`. Where the new layer is BatchNorm-shaped (SyncBN,
FrozenBN, BGN, BCN) it is the original module re-classed: it *shares* the original's
parameters, buffers, submodules and hooks, so ``state_dict`` keys and values are unchanged
and an optimizer built before conversion still holds the right tensors. GroupNorm shares
the original's affine parameters; its running statistics are gone, since GN has none.

Weight Standardization goes only on convolutions whose output feeds a normalization
converted to GN+WS (or BCN): :func:`distnorm.graph.conv_norm_links` finds them by tracing
the model with torch.fx, falling back to module order where tracing fails, and the
conversion report lists every convolution it standardized.

Converted SyncBN and FrozenBN layers are instances of the torch class they replaced
(``SyncBatchNorm2d`` is an ``nn.BatchNorm2d``), so tools that find BatchNorms by type find
them; every converted layer accepts the input ranks its original accepted, no others.
Norm-act layers (timm's ``BatchNormAct2d``; :func:`distnorm.register_norm_act`) become
the chosen normalization followed by their own dropout and activation, under every norm.
Other BatchNorm subclasses become, for ``sync_bn``, a subclass of *both* their own class
and SyncBatchNorm, so their extra behaviour stays; if such a class computes the
normalization itself instead of calling ``super().forward``, its first forward raises
:class:`ConversionError` naming the module; converting one to another norm is refused.

``revert_model`` gives back plain torch modules with identical eval outputs, for export:
the original BatchNorm classes (BGN with its group statistics spread over the channels;
BCN as BatchNorm followed by GroupNorm), plain convolutions holding the standardized weights.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parallel import DistributedDataParallel

from distnorm import comm
from distnorm.errors import ConversionError, layer_label
from distnorm.graph import conv_norm_links
from distnorm.layers.batch_channel_norm import BatchChannelNorm
from distnorm.layers.batch_group_norm import BatchGroupNorm
from distnorm.layers.frozen_batchnorm import FrozenBatchNorm
from distnorm.layers.group_norm import GroupNorm, check_num_groups, choose_num_groups
from distnorm.layers.inputs import input_dims_of
from distnorm.layers.norm_act import TORCH_BATCHNORMS, NormAct, post_modules_of
from distnorm.layers.std_conv import WSConv1d, WSConv2d, WSConv3d
from distnorm.layers.sync_batchnorm import SyncBatchNorm
from distnorm.logs import get_logger
from distnorm.norms import NORMS, norm_of, pairs_with_ws
from distnorm.policy import Plan
from distnorm.policy import plan as make_plan
from distnorm.table import format_table

logger = get_logger(__name__)

# Normalization layers that distnorm leaves as they are; listed in reports so that the
# user sees they were considered, not missed.
UNCONVERTED_NORMS = (nn.LayerNorm, nn.GroupNorm, _InstanceNorm, nn.LocalResponseNorm, nn.RMSNorm)

# The normalizations convert_model(norm=...) can put in every BatchNorm's place.
FORCEABLE_NORMS = tuple(name for name, norm in NORMS.items() if norm.forceable)

# The layers that have subclasses of torch's BatchNorm1d/2d/3d, with those subclasses.
_LAYER_OF_DIMENSION = {n.layer: n.by_dimension for n in NORMS.values() if n.by_dimension}

# Weight-standardized convolutions by the torch convolution they replace.
_WS_CONV_OF = {nn.Conv1d: WSConv1d, nn.Conv2d: WSConv2d, nn.Conv3d: WSConv3d}
_CONV_OF_WS = {ws: conv for conv, ws in _WS_CONV_OF.items()}

# What convert_model sets on every module it converts; revert_model drops it again, with
# what the layer itself holds (its class's ``_distnorm_attributes``).
_CONVERSION_ATTRIBUTES = ("_distnorm_origin", "_distnorm_name", "input_dims")


@dataclass(frozen=True)
class LayerTarget:
    """What one BatchNorm becomes: a ``norm`` name from :data:`FORCEABLE_NORMS` or
    ``"keep"`` (left exactly as it is, converted or not), the process group
    its statistics span (synchronized layers), its number of groups (GN, BCN, BGN;
    None chooses one with :func:`~distnorm.layers.group_norm.choose_num_groups`), and the
    micro-batches its statistics pool over (``sync_bn`` only; 1: each micro-batch alone)."""

    norm: str
    process_group: comm.Group = None
    num_groups: int | None = None
    accumulation_steps: int = 1

    def __post_init__(self) -> None:
        steps = self.accumulation_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConversionError(
                f"accumulation_steps must be a positive integer (micro-batches per optimizer "
                f"step), got {steps!r}"
            )
        if steps > 1 and not NORMS[self.norm].accumulates:
            raise ConversionError(
                f"accumulation_steps={steps} with norm={self.norm!r}: only sync_bn pools "
                "statistics over micro-batches; use norm='sync_bn', or leave "
                "accumulation_steps out"
            )


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
    live_world = comm.world_layout().world_size
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
                f"{_where(name, module)} has no entry in the plan; the plan was made for "
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
        standardize = _feeding_convs(
            model, (_BatchNorm,), lambda name: weight_standardization(targets[name])
        )

    def convert(name: str, module: nn.Module) -> nn.Module | None:
        if name in standardize:
            return _standardized(name, module)
        if name in targets and isinstance(module, _BatchNorm):
            return convert_layer(name, module, targets[name], check_sync)
        return None

    converted = _replace_modules(model, convert)
    if logger.isEnabledFor(logging.INFO):  # the report walks the model again: only if shown
        logger.info("distnorm.convert_model:\n%s", conversion_report(converted))
    return converted


def _feeding_convs(
    model: nn.Module, norm_types: tuple[type, ...], wanted: Callable[[str], bool]
) -> set[str]:
    """The convolutions of ``model`` to standardize: those feeding a layer of
    ``norm_types`` whose name is ``wanted`` (:func:`distnorm.graph.conv_norm_links`),
    except filters of one weight, which standardizing would zero."""
    links = conv_norm_links(model, norm_types)
    if links.method != "torch.fx":
        logger.info("distnorm: weight standardization placed by %s", links.reason)
    convs = {conv for conv, norm in links.pairs if wanted(norm)}
    single_weight = {n for n in convs if model.get_submodule(n).weight[0].numel() < 2}
    if single_weight:
        logger.info(
            "distnorm: convolutions left plain (1 weight per filter): %s",
            ", ".join(sorted(single_weight)),
        )
    return convs - single_weight


def standardize_weights(model: nn.Module) -> nn.Module:
    """Give Weight Standardization to the convolutions of ``model`` that feed distnorm
    layers it pairs with (:func:`pairs_with_ws`), as
    :func:`convert_model` does: for models built with :func:`distnorm.norm_layer`, whose
    norm factory never sees the convolutions. Returns the model (in place)."""
    layers = tuple(norm.layer for norm in NORMS.values() if norm.layer is not None)

    def wanted(name: str) -> bool:
        layer = model.get_submodule(name)
        return pairs_with_ws(norm_of(layer), getattr(layer, "accumulation_steps", 1))

    standardize = _feeding_convs(model, layers, wanted)
    return _replace_modules(
        model, lambda name, module: _standardized(name, module) if name in standardize else None
    )


# Normalizations whose feeding convolutions get Weight Standardization by default.
WS_NORMS = frozenset(name for name, norm in NORMS.items() if norm.ws_default)


def _ws_rule(weight_standardization: bool | None) -> Callable[[LayerTarget], bool]:
    """Which targets get Weight Standardization for ``weight_standardization`` (None: the
    default pairings)."""
    if weight_standardization is None:
        return lambda target: pairs_with_ws(target.norm, target.accumulation_steps)
    if weight_standardization:
        return lambda target: NORMS[target.norm].ws_allowed
    return lambda target: False


def convert_layer(
    name: str, module: _BatchNorm, target: LayerTarget, check_sync: bool | None
) -> nn.Module | None:
    """``module`` (named ``name``) as ``target`` asks, or None where it stays as it is."""
    if target.norm == "keep":
        return None
    current = norm_of(module)
    if current is not None:  # converted before: the same norm again is a no-op
        steps = getattr(module, "accumulation_steps", 1)
        if current == target.norm and steps != target.accumulation_steps:
            raise ConversionError(
                f"{_where(name, module)} is already converted to {current!r} with "
                f"accumulation_steps={steps}; call distnorm.revert_model first to convert "
                f"it with accumulation_steps={target.accumulation_steps}"
            )
        if current == target.norm:
            return None
        raise ConversionError(
            f"{_where(name, module)} is already converted to {current!r}; call "
            f"distnorm.revert_model first to convert it to {target.norm!r}"
        )
    if target.norm == "bn":
        return None
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise ConversionError(
            f"{_where(name, module)} is a lazy module whose parameters are not yet "
            "materialized; run one forward pass before convert_model"
        )
    post = post_modules_of(module)  # a norm-act layer's dropout and activation
    own_forward = type(module) not in TORCH_BATCHNORMS and post is None
    norm = NORMS[target.norm]
    if own_forward and not norm.keeps_own_forward:
        raise ConversionError(
            f"{_where(name, module)} is a BatchNorm subclass with behaviour of its own; only "
            f"'sync_bn' keeps it (by calling its forward), {target.norm!r} would drop it. "
            "Convert this layer to 'sync_bn' or 'bn'; or, if it is BatchNorm followed by "
            "submodules such as dropout and an activation, declare them with "
            "distnorm.register_norm_act(cls, post=[...])"
        )
    if target.norm == "gn_ws":
        converted = _group_norm(name, module, target.num_groups, post or ())
    elif target.norm == "frozen_bn":
        converted = _reclass(module, _layer_class(norm.layer, type(module), post or ()))
        converted._freeze()
    else:  # the synchronized layers
        if own_forward:
            converted = _reclass(module, _synchronized(type(module)))
        else:
            converted = _reclass(module, _layer_class(norm.layer, type(module), post or ()))
        group = target.process_group
        if group is None:  # torch's SyncBatchNorm brings a group of its own
            group = getattr(module, "process_group", None)
        converted._distnorm_name = name  # first: its name identifies it in the sync check
        converted._init_sync_state(group, check_sync, accumulation_steps=target.accumulation_steps)
        if target.norm == "bgn":
            converted._init_group_state(_num_groups(name, module, target.num_groups))
        elif target.norm == "bcn":
            converted._init_channel_state(_num_groups(name, module, target.num_groups))
    converted.input_dims = input_dims_of(type(module))
    converted._distnorm_origin = type(module)
    converted._distnorm_name = name
    return converted


@functools.cache
def _layer_class(
    layer: type[nn.Module], origin: type[nn.Module], post: tuple[str, ...]
) -> type[nn.Module]:
    """The class a BatchNorm of class ``origin`` becomes as a ``layer``: ``layer`` itself,
    its 1d/2d/3d subclass for torch's BatchNorm1d/2d/3d (BatchNorm-shaped layers only),
    and for a norm-act ``origin`` (``post``: its dropout and activation) a subclass of
    :class:`NormAct`, ``layer`` and, when BatchNorm-shaped, ``origin`` too."""
    by_dimension = _LAYER_OF_DIMENSION.get(layer)
    made = layer
    if by_dimension is not None:
        base = next((b for b in by_dimension if issubclass(origin, b)), None)
        made = by_dimension.get(base, layer)  # type: ignore[arg-type]
    if origin in TORCH_BATCHNORMS or not post:
        return made
    bases = (NormAct, made) if by_dimension is None else (NormAct, made, origin)
    dimension = made.__name__[-2:] if made.__name__[-2:] in ("1d", "2d", "3d") else ""
    name = f"{made.__name__.removesuffix(dimension)}Act{dimension}"  # e.g. SyncBatchNormAct2d

    def reduce(self: nn.Module, protocol: Any) -> Any:
        # Pickle by the classes it is made of: the class is made again on load.
        return (_new_layer, (layer, origin, post), self.__getstate__())

    return type(
        name,
        bases,
        {"post_modules": post, "__reduce_ex__": reduce, "__module__": __name__},
    )


def _new_layer(layer: type[nn.Module], origin: type[nn.Module], post: tuple[str, ...]) -> Any:
    """Unpickling helper for :func:`_layer_class`'s classes."""
    return object.__new__(_layer_class(layer, origin, post))


def _num_groups(name: str, module: _BatchNorm, forced: int | None) -> int:
    """G for a layer of ``module.num_features`` channels: ``forced`` when it divides them,
    else GroupNorm's default reduced to a divisor (``choose_num_groups``)."""
    if forced is None:
        return choose_num_groups(module.num_features, layer=_where(name, module))
    return check_num_groups(module.num_features, forced, layer=_where(name, module))


def _group_norm(
    name: str, module: _BatchNorm, num_groups: int | None, post: tuple[str, ...]
) -> GroupNorm:
    """A GroupNorm over the same channels, sharing the BatchNorm's affine parameters (and
    a norm-act's ``post`` submodules)."""
    groups = _num_groups(name, module, num_groups)
    reference = module.weight if module.weight is not None else module.running_mean
    layer = _layer_class(NORMS["gn_ws"].layer, type(module), post)(
        groups, module.num_features, eps=module.eps, affine=False,
        device=None if reference is None else reference.device,
    )  # fmt: skip
    layer.affine = module.affine
    layer.weight, layer.bias = module.weight, module.bias
    for submodule in post:
        layer.add_module(submodule, module._modules[submodule])
    layer.train(module.training)
    return layer


def _standardized(name: str, conv: nn.Module) -> nn.Module | None:
    """The convolution re-classed as its weight-standardized twin (same parameters)."""
    if type(conv) not in _WS_CONV_OF:
        return None  # already standardized, or a conv subclass distnorm does not know
    standardized = _reclass(conv, _WS_CONV_OF[type(conv)])
    standardized._init_standardization()
    standardized._distnorm_origin = type(conv)
    standardized._distnorm_name = name
    return standardized


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

    def to_torch(name: str, module: nn.Module) -> nn.Module | None:
        origin = getattr(module, "_distnorm_origin", None)
        if type(module) in _CONV_OF_WS:
            return _plain_conv(module, origin or _CONV_OF_WS[type(module)])
        post = getattr(module, "post_modules", ())  # a norm-act layer's dropout, activation
        if isinstance(module, GroupNorm):  # a GroupNorm it stays
            return _followed_by(_reverted(module, nn.GroupNorm), module, post)
        if norm_of(module) is None:
            return None
        origin = origin or nn.BatchNorm2d
        if isinstance(module, BatchChannelNorm):
            torch_class = next(c for c in origin.__mro__ if c in TORCH_BATCHNORMS)
            return _followed_by(module.to_torch(torch_class), module, post)
        # torch's SyncBatchNorm holds a process group of its own
        keep = ("process_group",) if issubclass(origin, nn.SyncBatchNorm) else ()
        reverted = _reverted(module, origin, keep)
        if isinstance(module, BatchGroupNorm) and module.channel_running_stats() is not None:
            reverted.running_mean, reverted.running_var = module.channel_running_stats()
        if isinstance(module, FrozenBatchNorm):
            for parameter in (reverted.weight, reverted.bias):
                if parameter is not None:
                    parameter.requires_grad_(True)
        return reverted

    return _replace_modules(model, to_torch)


def _reverted(module: nn.Module, cls: type[nn.Module], keep: tuple[str, ...] = ()) -> nn.Module:
    """``module`` re-classed as ``cls``, without what conversion and the distnorm layer
    (its ``_distnorm_attributes``) added to it, except ``keep``."""
    reverted = _reclass(module, cls)
    for attribute in (*_CONVERSION_ATTRIBUTES, *getattr(module, "_distnorm_attributes", ())):
        if attribute not in keep:
            reverted.__dict__.pop(attribute, None)
    return reverted


def _followed_by(norm: nn.Module, layer: nn.Module, post: tuple[str, ...]) -> nn.Module:
    """``norm`` alone, or ``Sequential(norm, *post)`` with the norm-act ``layer``'s ``post``
    submodules (taken out of ``norm``, which may hold them as a copy of ``layer``)."""
    if not post:
        return norm
    for submodule in post:
        norm._modules.pop(submodule, None)
    return nn.Sequential(norm, *(layer._modules[submodule] for submodule in post))


def _plain_conv(conv: nn.Module, origin: type[nn.Module]) -> nn.Module:
    """A plain convolution computing what the weight-standardized ``conv`` computes."""
    plain = _reverted(conv, origin)
    plain.weight = nn.Parameter(conv.standardized_weight().detach().clone())
    return plain


@dataclass(frozen=True)
class ConversionRow:
    """One normalization layer: where it is, what it was, what it is now."""

    name: str
    original: str
    converted: str
    sync_group: str
    accumulation_steps: int = 1


@dataclass(frozen=True)
class ConversionReport:
    """The normalization layers of a model after conversion; prints as a table."""

    rows: tuple[ConversionRow, ...]

    def __str__(self) -> str:
        if not self.rows:
            return "no normalization layers"
        return format_table(
            ("layer", "was", "now", "sync group"),
            [
                (
                    r.name,
                    r.original,
                    r.converted
                    if r.accumulation_steps == 1
                    else f"{r.converted} (k={r.accumulation_steps})",
                    r.sync_group,
                )
                for r in self.rows
            ],
        )

    @property
    def converted(self) -> tuple[ConversionRow, ...]:
        """The rows of layers that distnorm replaced."""
        return tuple(r for r in self.rows if r.original != r.converted)

    @property
    def standardized_convs(self) -> tuple[str, ...]:
        """Names of the convolutions given Weight Standardization."""
        ws_names = {cls.__name__ for cls in _WS_CONV_OF.values()}
        return tuple(r.name for r in self.rows if r.converted in ws_names)


def conversion_report(model: nn.Module) -> ConversionReport:
    """What :func:`convert_model` did to ``model``: every layer it replaced (normalizations
    and standardized convolutions) with its original class and sync group, and every other
    normalization layer, marked as left alone."""
    rows = []
    for name, module in model.named_modules():
        name = name or "(root)"
        origin = getattr(module, "_distnorm_origin", None)
        if origin is not None or (isinstance(module, _BatchNorm) and norm_of(module)):
            synchronized = isinstance(module, SyncBatchNorm)
            rows.append(
                ConversionRow(
                    name,
                    origin.__name__ if origin is not None else "-",
                    type(module).__name__,
                    comm.describe_group(module.process_group) if synchronized else "-",
                    getattr(module, "accumulation_steps", 1) if synchronized else 1,
                )
            )
        elif isinstance(module, (_BatchNorm, *UNCONVERTED_NORMS)):
            kind = type(module).__name__
            rows.append(ConversionRow(name, kind, kind, "- (left alone)"))
    return ConversionReport(tuple(rows))


def _where(name: str, module: nn.Module) -> str:
    return f"module '{name or '(root)'}' ({type(module).__name__})"


def _replace_modules(
    root: nn.Module, replace: Callable[[str, nn.Module], nn.Module | None]
) -> nn.Module:
    """Apply ``replace(qualified_name, module)`` to ``root`` and every submodule, top down;
    a non-None result takes the module's place and is not descended into. A module shared
    by several parents is replaced once, by one shared replacement."""
    replacements: dict[int, nn.Module] = {}

    def visit(name: str, module: nn.Module) -> nn.Module:
        if id(module) in replacements:
            return replacements[id(module)]
        replacement = replace(name, module)
        replacements[id(module)] = module if replacement is None else replacement
        if replacement is not None:
            return replacement
        # _modules, not named_children(): the latter yields a shared module only once.
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            new_child = visit(f"{name}.{child_name}" if name else child_name, child)
            if new_child is not child:
                module._modules[child_name] = new_child
        return module

    return visit("", root)


def _reclass(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A new ``cls`` instance with ``module``'s state: the same parameter, buffer and
    submodule objects, hooks and plain attributes, in containers of its own so that
    ``module`` itself is left as it was. ``cls.__init__`` is not called."""
    new = object.__new__(cls)
    new.__dict__.update(
        {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()}
    )
    return new


class _SyncForwardProbe(SyncBatchNorm):
    """Sits between a BatchNorm subclass and SyncBatchNorm in a synchronized subclass's
    method resolution order and records that the subclass's forward reached it."""

    _distnorm_attributes = (*SyncBatchNorm._distnorm_attributes, "_reached_sync")

    def forward(self, input: Tensor) -> Tensor:
        self._reached_sync = True
        return super().forward(input)


@functools.cache
def _synchronized(cls: type[_BatchNorm]) -> type[SyncBatchNorm]:
    """``class SyncX(X, SyncBatchNorm)``: X's behaviour with SyncBatchNorm's statistics.

    X's ``super().forward(input)`` resolves to SyncBatchNorm's forward; a forward that does
    not get there (because it calls ``F.batch_norm`` itself) raises instead of silently
    computing local statistics.
    """

    class Synchronized(cls, _SyncForwardProbe):  # type: ignore[valid-type, misc]
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            self._reached_sync = False
            output = super().forward(*args, **kwargs)
            if not self._reached_sync:
                raise ConversionError(
                    f"{layer_label(self)}: {cls.__qualname__}.forward computes the "
                    "normalization without calling super().forward(), so distnorm cannot "
                    "synchronize its statistics. Make it call super().forward(input) for the "
                    "BatchNorm part; or, if it is BatchNorm followed by submodules such as "
                    "dropout and an activation, declare them with "
                    "distnorm.register_norm_act(cls, post=[...])."
                )
            return output

        def __reduce_ex__(self, protocol: Any) -> Any:
            # Pickle by the original class: the synchronized class is rebuilt on load.
            return (_new_synchronized, (cls,), self.__getstate__())

    Synchronized.__name__ = f"Sync{cls.__name__}"
    Synchronized.__qualname__ = f"Sync{cls.__qualname__}"
    return Synchronized


def _new_synchronized(cls: type[_BatchNorm]) -> nn.Module:
    """Unpickling helper for synchronized subclasses."""
    return object.__new__(_synchronized(cls))
