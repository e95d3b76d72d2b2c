"""Module surgery: swap a model's BatchNorm layers for distnorm's, and back.

``convert_model`` walks the module tree and replaces each BatchNorm with a
:class:`~distnorm.layers.SyncBatchNorm` that *shares* the original's parameters, buffers,
submodules and hooks: nothing is copied, so ``state_dict`` keys and values are unchanged
(checkpoints load both ways) and an optimizer built before conversion still holds the
right tensors. The ``training`` flag, and every attribute the original carried, come along.

BatchNorm subclasses that add behaviour (timm's ``BatchNormAct2d`` style: an activation
after the norm) are converted to a subclass of *both* their own class and SyncBatchNorm,
so their extra behaviour stays; if such a class computes the normalization itself instead
of calling ``super().forward``, its first forward raises :class:`ConversionError` naming
the module, rather than silently training unsynchronized.

``revert_model`` gives back the original torch classes (plain ``nn.BatchNorm2d`` and
friends) with identical eval outputs, for export.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parallel import DistributedDataParallel

from distnorm import comm
from distnorm.errors import ConversionError, layer_label
from distnorm.layers.sync_batchnorm import SyncBatchNorm
from distnorm.logs import get_logger
from distnorm.table import format_table

logger = get_logger(__name__)

# torch's own BatchNorm classes: their forward is the plain BatchNorm transform, so they
# become a plain SyncBatchNorm. Any other _BatchNorm subclass keeps its class (see above).
TORCH_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# Normalization layers that distnorm leaves as they are; listed in reports so that the
# user sees they were considered, not missed.
UNCONVERTED_NORMS = (nn.LayerNorm, nn.GroupNorm, _InstanceNorm, nn.LocalResponseNorm, nn.RMSNorm)

# What a synchronized layer holds besides its original's state; dropped again on revert.
_SYNC_ATTRIBUTES = (
    "process_group",
    "_shift",
    "_distnorm_origin",
    "_distnorm_name",
    "_reached_sync",
)


def convert_model(model: nn.Module, *, process_group: comm.Group = None) -> nn.Module:
    """Replace every BatchNorm in ``model`` with a :class:`SyncBatchNorm` over
    ``process_group`` (default: the world) and return the converted model.

    The model is changed in place, but a BatchNorm at the root is replaced, so always use
    the return value. Convert *before* wrapping the model in DDP, Accelerate or DeepSpeed.
    Converting an already converted model changes nothing. ``conversion_report(model)``
    lists what was replaced; it is also logged (rank 0, INFO).
    """
    if isinstance(model, DistributedDataParallel):
        raise ConversionError(
            "convert_model got a DistributedDataParallel wrapper; convert the model first "
            "and wrap it afterwards: DDP(distnorm.convert_model(model))"
        )

    def to_sync(name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, _BatchNorm) or isinstance(module, SyncBatchNorm):
            return None
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise ConversionError(
                f"{_where(name, module)} is a lazy module whose parameters are not yet "
                "materialized; run one forward pass before convert_model"
            )
        target = SyncBatchNorm if type(module) in TORCH_BATCHNORMS else _synchronized(type(module))
        converted = _reclass(module, target)
        converted._init_sync_state(
            process_group if process_group is not None else getattr(module, "process_group", None)
        )
        converted._distnorm_origin = type(module)
        converted._distnorm_name = name
        return converted

    converted = _replace_modules(model, to_sync)
    if logger.isEnabledFor(logging.INFO):  # the report walks the model again: only if shown
        logger.info("distnorm.convert_model:\n%s", conversion_report(converted))
    return converted


def revert_model(model: nn.Module) -> nn.Module:
    """Give every distnorm layer in ``model`` its original torch class again (a directly
    constructed SyncBatchNorm becomes ``nn.BatchNorm2d``), sharing parameters and buffers,
    so that eval outputs are identical. In place except at the root; use the return value.
    """

    def to_torch(name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, SyncBatchNorm):
            return None
        origin = getattr(module, "_distnorm_origin", nn.BatchNorm2d)
        reverted = _reclass(module, origin)
        for attribute in _SYNC_ATTRIBUTES:
            if attribute == "process_group" and issubclass(origin, nn.SyncBatchNorm):
                continue  # torch's SyncBatchNorm holds a process group of its own
            reverted.__dict__.pop(attribute, None)
        return reverted

    return _replace_modules(model, to_torch)


@dataclass(frozen=True)
class ConversionRow:
    """One normalization layer: where it is, what it was, what it is now."""

    name: str
    original: str
    converted: str
    sync_group: str


@dataclass(frozen=True)
class ConversionReport:
    """The normalization layers of a model after conversion; prints as a table."""

    rows: tuple[ConversionRow, ...]

    def __str__(self) -> str:
        if not self.rows:
            return "no normalization layers"
        return format_table(
            ("layer", "was", "now", "sync group"),
            [(r.name, r.original, r.converted, r.sync_group) for r in self.rows],
        )

    @property
    def converted(self) -> tuple[ConversionRow, ...]:
        """The rows of layers that distnorm replaced."""
        return tuple(r for r in self.rows if r.original != r.converted)


def conversion_report(model: nn.Module) -> ConversionReport:
    """What :func:`convert_model` did to ``model``: every distnorm layer with its original
    class and sync group, and every other normalization layer, marked as left alone."""
    rows = []
    for name, module in model.named_modules():
        name = name or "(root)"
        if isinstance(module, SyncBatchNorm):
            origin = getattr(module, "_distnorm_origin", None)
            rows.append(
                ConversionRow(
                    name,
                    origin.__name__ if origin is not None else "-",
                    type(module).__name__,
                    comm.describe_group(module.process_group),
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
                    "BatchNorm part, or replace it with distnorm.SyncBatchNorm followed by "
                    "its extra layers."
                )
            return output

        def __reduce_ex__(self, protocol: Any) -> Any:
            # Pickle by the original class: the synchronized class is rebuilt on load.
            return (_new_synchronized, (cls,), self.__dict__)

    Synchronized.__name__ = f"Sync{cls.__name__}"
    Synchronized.__qualname__ = f"Sync{cls.__qualname__}"
    return Synchronized


def _new_synchronized(cls: type[_BatchNorm]) -> nn.Module:
    """Unpickling helper for synchronized subclasses."""
    return object.__new__(_synchronized(cls))
