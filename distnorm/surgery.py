"""Module surgery: one BatchNorm into a distnorm layer and back, and the model walk.

Where the new layer is BatchNorm-shaped (SyncBN, FrozenBN, BGN, BCN) it is the original
module re-classed: it *shares* the original's parameters, buffers, submodules and hooks, so
``state_dict`` keys and values are unchanged and an optimizer built before conversion still
holds the right tensors. GroupNorm shares the original's affine parameters; its running
statistics are gone, since GN has none. Converted SyncBN and FrozenBN layers are instances
of the torch class they replaced (``SyncBatchNorm2d`` is an ``nn.BatchNorm2d``), and every
converted layer accepts the input ranks its original accepted, no others.

Norm-act layers (timm's ``BatchNormAct2d``; :func:`distnorm.register_norm_act`) become the
chosen normalization followed by their own dropout and activation. Other BatchNorm
subclasses become, for ``sync_bn``, a subclass of *both* their own class and SyncBatchNorm,
so their extra behaviour stays; if such a class computes the normalization itself instead
of calling ``super().forward``, its first forward raises :class:`ConversionError`.

Weight Standardization goes on the convolutions feeding a layer that pairs with it, found
by :func:`distnorm.graph.conv_norm_links`. Reverting gives the original torch classes back
without what conversion and the layer (its ``_distnorm_attributes``) added.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

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
from distnorm.norms import NORMS, norm_of

logger = get_logger(__name__)

# The layers that have subclasses of torch's BatchNorm1d/2d/3d, with those subclasses.
_LAYER_OF_DIMENSION = {n.layer: n.by_dimension for n in NORMS.values() if n.by_dimension}

# Weight-standardized convolutions by the torch convolution they replace.
WS_CONV_OF = {nn.Conv1d: WSConv1d, nn.Conv2d: WSConv2d, nn.Conv3d: WSConv3d}
_CONV_OF_WS = {ws: conv for conv, ws in WS_CONV_OF.items()}

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
                f"{where(name, module)} is already converted to {current!r} with "
                f"accumulation_steps={steps}; call distnorm.revert_model first to convert "
                f"it with accumulation_steps={target.accumulation_steps}"
            )
        if current == target.norm:
            return None
        raise ConversionError(
            f"{where(name, module)} is already converted to {current!r}; call "
            f"distnorm.revert_model first to convert it to {target.norm!r}"
        )
    if target.norm == "bn":
        return None
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise ConversionError(
            f"{where(name, module)} is a lazy module whose parameters are not yet "
            "materialized; run one forward pass before convert_model"
        )
    post = post_modules_of(module)  # a norm-act layer's dropout and activation
    own_forward = type(module) not in TORCH_BATCHNORMS and post is None
    norm = NORMS[target.norm]
    if own_forward and not norm.keeps_own_forward:
        raise ConversionError(
            f"{where(name, module)} is a BatchNorm subclass with behaviour of its own; only "
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
        return choose_num_groups(module.num_features, layer=where(name, module))
    return check_num_groups(module.num_features, forced, layer=where(name, module))


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


def standardized_conv(name: str, conv: nn.Module) -> nn.Module | None:
    """The convolution re-classed as its weight-standardized twin (same parameters)."""
    if type(conv) not in WS_CONV_OF:
        return None  # already standardized, or a conv subclass distnorm does not know
    ws_conv = _reclass(conv, WS_CONV_OF[type(conv)])
    ws_conv._init_standardization()
    ws_conv._distnorm_origin = type(conv)
    ws_conv._distnorm_name = name
    return ws_conv


def feeding_convs(
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


def revert_layer(name: str, module: nn.Module) -> nn.Module | None:
    """``module`` (named ``name``) as plain torch modules, as :func:`distnorm.revert_model`
    gives it; None for a module that is no distnorm layer."""
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


def where(name: str, module: nn.Module) -> str:
    return f"module '{name or '(root)'}' ({type(module).__name__})"


def replace_modules(
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
