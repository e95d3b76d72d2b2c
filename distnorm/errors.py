"""Exceptions raised by distnorm, and how they name the layer at fault.

Every error distnorm raises derives from :class:`DistNormError`, so callers can catch the
library's refusals without catching unrelated torch errors.
"""

from __future__ import annotations

from torch import nn


class DistNormError(Exception):
    """Base class of every error distnorm raises."""


class ConversionError(DistNormError, TypeError):
    """A module cannot be converted (or reverted) without changing what it computes."""


class InputError(DistNormError, ValueError):
    """A layer received an input it cannot normalize (shape, dtype, or too few values)."""


class SyncMismatchError(DistNormError, RuntimeError):
    """The ranks of a sync group met in one collective from different synchronized layers,
    or from different calls or directions of one layer. Raised on every rank of the group,
    each naming the layer it was in, before any statistic is used; the ranks' control flow
    differs, which would otherwise mix two layers' statistics or hang."""


class PolicyError(DistNormError, ValueError):
    """A policy, an override or a plan asks for something invalid or impossible: an
    unknown key, a value of the wrong kind, a sync group larger than the world, a number
    of groups that does not divide a layer's channels. The message names the key or the
    layer, and says what would be accepted."""


def layer_label(module: nn.Module) -> str:
    """``"SyncBatchNorm 'layer1.0.bn1'"`` when :func:`distnorm.convert_model` named the
    module, else just its class name; used so that errors say *which* layer failed."""
    name = getattr(module, "_distnorm_name", None)
    kind = type(module).__name__
    return f"{kind} '{name}'" if name else kind
