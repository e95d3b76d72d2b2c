"""The normalizations distnorm knows: one entry per ``norm=`` name, with its properties.

``convert_model``, the policy, ``norm_layer`` and the plan's checks read what a norm is
(its layer, whether it synchronizes, takes channel groups, pools micro-batches, pairs
with Weight Standardization) here instead of keeping lists of names of their own, so a
new normalization is one layer module in :mod:`distnorm.layers` and one entry below.

The registry holds the layer classes themselves: layers import only ``comm``, ``health``
and ``errors``, never the policy or conversion, so this module sits between them without
a cycle (the policy already depended on the layer modules for its facts and groupings).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from torch import nn

from distnorm import layers


@dataclass(frozen=True)
class Norm:
    """One normalization. ``layer``: distnorm's class for it (None: the BatchNorm stays
    torch's); ``by_dimension``: its subclasses of torch's ``BatchNorm1d/2d/3d``, so tools
    finding BatchNorms by type find converted layers; ``synchronizes``: may share its
    statistics over a group of ranks; ``grouped``: takes a number of channel groups;
    ``accumulates``: may pool statistics over the micro-batches of an optimizer step;
    ``ws_default``: the convolutions feeding it get Weight Standardization by default
    (an accumulating layer does too: :func:`pairs_with_ws`); ``ws_allowed``: they may be
    asked to (not under measured statistics); ``forceable``: ``convert_model(norm=...)``
    takes it; ``keeps_own_forward``: a BatchNorm subclass with a forward of its own keeps
    that forward under it."""

    name: str
    label: str
    layer: type[nn.Module] | None = None
    by_dimension: Mapping[type[nn.Module], type[nn.Module]] = field(default_factory=dict)
    synchronizes: bool = False
    grouped: bool = False
    accumulates: bool = False
    ws_default: bool = False
    ws_allowed: bool = True
    forceable: bool = True
    keeps_own_forward: bool = False


def _by_dimension(prefix: str) -> Mapping[type[nn.Module], type[nn.Module]]:
    """``layers.<prefix>1d/2d/3d`` by the torch BatchNorm each subclasses."""
    torch_classes = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    return {base: getattr(layers, f"{prefix}{base.__name__[-2:]}") for base in torch_classes}


# In the order error messages and documentation list them. "keep" is a plan's decision
# to leave a module exactly as it is, not a normalization one can force.
NORMS: Mapping[str, Norm] = MappingProxyType(
    {
        norm.name: norm
        for norm in (
            Norm("bn", "BN", keeps_own_forward=True),
            Norm(
                "sync_bn",
                "SyncBN",
                layers.SyncBatchNorm,
                _by_dimension("SyncBatchNorm"),
                synchronizes=True,
                accumulates=True,
                keeps_own_forward=True,
            ),
            Norm("gn_ws", "GN+WS", layers.GroupNorm, grouped=True, ws_default=True),
            Norm(
                "bcn",
                "BCN+WS",
                layers.BatchChannelNorm,
                synchronizes=True,
                grouped=True,
                ws_default=True,
            ),
            Norm(
                "bgn",
                "BGN+WS",
                layers.BatchGroupNorm,
                synchronizes=True,
                grouped=True,
                ws_default=True,
            ),
            Norm(
                "frozen_bn",
                "FrozenBN",
                layers.FrozenBatchNorm,
                _by_dimension("FrozenBatchNorm"),
                ws_allowed=False,
            ),
            Norm("keep", "keep", ws_allowed=False, forceable=False, keeps_own_forward=True),
        )
    }
)

_NORM_OF_LAYER = {norm.layer: name for name, norm in NORMS.items() if norm.layer is not None}


def norm_of(module: nn.Module) -> str | None:
    """The name of the normalization a distnorm layer implements (its most derived
    registered class: a BatchGroupNorm is a SyncBatchNorm too); None for anything else."""
    return next((_NORM_OF_LAYER[c] for c in type(module).__mro__ if c in _NORM_OF_LAYER), None)


def pairs_with_ws(norm: str | None, accumulation_steps: int = 1) -> bool:
    """Whether a layer of ``norm`` (pooling over ``accumulation_steps`` micro-batches)
    gets Weight Standardization of its feeding convolutions by default: Qiao et al. pair
    it with GroupNorm and Batch-Channel Norm; Batch Group Norm underfits without it, and
    so does SyncBN pooling over micro-batches (benchmarks/results/accuracy.md)."""
    entry = NORMS.get(norm) if norm is not None else None
    if entry is None:
        return False
    return entry.ws_default or (entry.accumulates and accumulation_steps > 1)
