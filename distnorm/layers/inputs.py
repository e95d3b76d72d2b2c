"""The input check every BatchNorm-shaped layer makes, so that each refuses bad input with
the same message naming the layer (torch's own errors name neither layer nor fix)."""

from __future__ import annotations

from torch import Tensor, nn

from distnorm.errors import InputError, layer_label

# The input ranks torch's BatchNorm classes accept; other classes: any rank from 2.
_INPUT_DIMS = ((nn.BatchNorm1d, (2, 3)), (nn.BatchNorm2d, (4,)), (nn.BatchNorm3d, (5,)))


def input_dims_of(cls: type[nn.Module]) -> tuple[int, ...] | None:
    """The input ranks a ``cls`` (a BatchNorm class, or a subclass) accepts: ``(2, 3)``
    for ``BatchNorm1d``, ``(4,)`` for ``2d``, ``(5,)`` for ``3d``; None (any rank from 2)
    for the rest, ``nn.SyncBatchNorm`` among them."""
    return next((dims for base, dims in _INPUT_DIMS if issubclass(cls, base)), None)


def check_channels_input(
    layer: nn.Module, input: Tensor, num_channels: int, dims: tuple[int, ...] | None = None
) -> None:
    """Raise :class:`InputError` naming ``layer`` unless ``input`` is a floating-point
    tensor of shape ``(N, num_channels, *)`` whose rank is one of ``dims`` (None: any
    rank from 2)."""
    if input.dim() < 2 or (dims is not None and input.dim() not in dims):
        expected = " or ".join(f"{d}-D" for d in dims) if dims else "(N, C, *)"
        raise InputError(
            f"{layer_label(layer)} expects {expected} input, got {input.dim()}-D input of "
            f"shape {tuple(input.shape)}; it replaced a layer that accepted only those"
            if dims
            else f"{layer_label(layer)} expects an input of shape (N, C, *), got "
            f"{input.dim()}-D input of shape {tuple(input.shape)}"
        )
    if input.size(1) != num_channels:
        raise InputError(
            f"{layer_label(layer)} has {num_channels} channels but its input has "
            f"{input.size(1)} (shape {tuple(input.shape)}); check the preceding layer"
        )
    if not input.is_floating_point():
        raise InputError(
            f"{layer_label(layer)} normalizes floating-point inputs, got {input.dtype}; "
            "convert the input with .float() first"
        )
