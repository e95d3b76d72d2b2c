"""The input check every BatchNorm-shaped layer makes, so that each refuses bad input with
the same message naming the layer (torch's own errors name neither layer nor fix)."""

from __future__ import annotations

from torch import Tensor, nn

from distnorm.errors import InputError, layer_label


def check_channels_input(layer: nn.Module, input: Tensor, num_channels: int) -> None:
    """Raise :class:`InputError` naming ``layer`` unless ``input`` is a floating-point
    tensor of shape ``(N, num_channels, *)``."""
    if input.dim() < 2:
        raise InputError(
            f"{layer_label(layer)} expects an input of shape (N, C, *), got {input.dim()}-D "
            f"input of shape {tuple(input.shape)}"
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
