"""Weight Standardization: convolutions whose filters are standardized before every use.

Maths: Qiao, Wang, Liu, Shen & Yuille (2019), arXiv:1903.10520, Sec. 3. The weight, read
as O rows (output channels) of I = C_in/groups * prod(kernel_size) values, is standardized
row by row, with no affine (the normalization after the convolution supplies one)::

    W_hat[i, j] = (W[i, j] - mu_i) / sigma_i,   mu_i = mean_j W[i, j],   y = W_hat * x

Gradients flow through mu_i and sigma_i (the method's point: Sec. 3). Two published sigmas:
``variant="paper"`` (default), ``sqrt(var_i + eps)`` with the biased variance, as timm's
``StdConv2d`` (so BiT / ViT-hybrid weights load and match), eps 1e-6; and
``variant="official"``, the authors' PyTorch layer, ``std_i + eps`` with the unbiased
std, eps 1e-5. They differ by sqrt(I / (I - 1)) plus the eps term: a following norm
removes the scale, but outputs are not interchangeable bit for bit. Keep "paper"'s eps
well below the filters' variance (about 1/(3I) at torch's default init).

Guarantees: ``state_dict`` keys are ``nn.Conv1d/2d/3d``'s and the stored weight is the
unstandardized W, so checkpoints load both ways; train and eval compute the same thing;
:meth:`standardized_weight` baked into a plain convolution reproduces the outputs.
Statistics in fp32 (fp64 for fp64 weights); the convolution in the input's dtype; the
weight's memory format kept. Cost per forward: one fused var_mean over the O * I weights
and one elementwise pass, nothing over the activations.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from distnorm.errors import InputError, layer_label
from distnorm.layers.kernels import stats_dtype

Variant = Literal["paper", "official"]

# Each variant's eps as in its source (see the module docstring).
DEFAULT_EPS: dict[str, float] = {"paper": 1e-6, "official": 1e-5}


class _WeightStandardization:
    """What WSConv1d/2d/3d add to their torch convolution: attributes, the standardized
    weight, and a forward that convolves with it. Placed before ``nn.ConvNd`` in the
    bases so that its ``forward`` is the one used."""

    # Class-level defaults, so that a module re-classed without __init__ still works.
    eps: float = DEFAULT_EPS["paper"]
    variant: Variant = "paper"
    # What this adds to a torch convolution's state, dropped by distnorm.revert_model.
    _distnorm_attributes: ClassVar[tuple[str, ...]] = ("eps", "variant")

    # Provided by nn.ConvNd.
    weight: Tensor
    bias: Tensor | None
    _conv_forward: Any

    def __init__(
        self, *args: Any, eps: float | None = None, variant: Variant = "paper", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_standardization(eps, variant)

    def _init_standardization(self, eps: float | None = None, variant: Variant = "paper") -> None:
        """Set the Weight Standardization attributes; called by ``__init__`` and by
        :func:`distnorm.convert_model` on a convolution it re-classes. ``eps=None`` takes
        the variant's default. Refuses settings that could only give NaN or a zero weight."""
        if variant not in DEFAULT_EPS:
            raise InputError(
                f"{layer_label(self)}: variant must be one of {sorted(DEFAULT_EPS)}, "
                f"got {variant!r}"
            )
        if eps is None:
            eps = DEFAULT_EPS[variant]
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise InputError(
                f"{layer_label(self)}: eps must be a finite number > 0, got {eps!r}; it keeps "
                f"the division finite for a constant filter (default for the {variant!r} "
                f"variant: {DEFAULT_EPS[variant]})"
            )
        fan_in = self.weight[0].numel()
        if fan_in < 2:
            raise InputError(
                f"{layer_label(self)} has a single weight per filter (C_in/groups * "
                f"prod(kernel_size) = {fan_in}, weight shape {tuple(self.weight.shape)}): "
                "standardizing it would make every filter 0 (or NaN), so the layer could "
                "never learn; keep a plain convolution here"
            )
        self.eps = float(eps)
        self.variant = variant

    def _standardized(self, dtype: torch.dtype) -> Tensor:
        """W_hat computed in fp32 (fp64 for fp64 weights), returned in ``dtype``."""
        weight = self.weight.to(stats_dtype(self.weight.dtype))
        filter_dims = tuple(range(1, weight.dim()))  # all but the output channel
        if self.variant == "paper":
            # sigma = sqrt(1/I sum (W - mu)^2 + eps)
            var, mean = torch.var_mean(weight, dim=filter_dims, correction=0, keepdim=True)
            standardized = (weight - mean) * torch.rsqrt(var + self.eps)
        else:
            # official code: sigma = sqrt(1/(I-1) sum (W - mu)^2) + eps
            std, mean = torch.std_mean(weight, dim=filter_dims, correction=1, keepdim=True)
            standardized = (weight - mean) / (std + self.eps)
        return standardized.to(dtype)

    def standardized_weight(self) -> Tensor:
        """W_hat in the weight's dtype and memory format, differentiable with respect to
        ``weight``. A plain ``nn.ConvNd`` holding it (detached) as its weight gives this
        layer's outputs exactly, for inputs of the weight's dtype."""
        return self._standardized(self.weight.dtype)

    def forward(self, input: Tensor) -> Tensor:
        if not input.is_floating_point():
            raise InputError(
                f"{layer_label(self)} convolves floating-point inputs, got {input.dtype}; "
                "convert the input with .float() first"
            )
        # y = W_hat * x + b, computed in the input's dtype.
        bias = None if self.bias is None else self.bias.to(input.dtype)
        return self._conv_forward(input, self._standardized(input.dtype), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps:g}, variant={self.variant!r}"  # type: ignore[misc]


class WSConv1d(_WeightStandardization, nn.Conv1d):
    """``nn.Conv1d`` with Weight Standardization (see the module docstring).

    Same arguments as ``nn.Conv1d``, plus keyword-only ``eps`` (None: the variant's
    default) and ``variant`` ("paper" or "official")."""


class WSConv2d(_WeightStandardization, nn.Conv2d):
    """``nn.Conv2d`` with Weight Standardization (see the module docstring).

    Same arguments as ``nn.Conv2d``, plus keyword-only ``eps`` (None: the variant's
    default) and ``variant`` ("paper" or "official")."""


class WSConv3d(_WeightStandardization, nn.Conv3d):
    """``nn.Conv3d`` with Weight Standardization (see the module docstring).

    Same arguments as ``nn.Conv3d``, plus keyword-only ``eps`` (None: the variant's
    default) and ``variant`` ("paper" or "official")."""
