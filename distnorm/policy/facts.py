"""What the policy needs to know about a model: its normalization layers and their inputs.

Which layers are normalization, of what kind, with how many channels, and, when a sample
input is given, the shape each one sees. The shape matters because a BatchNorm statistic
is computed over ``batch x spatial`` values, not over the batch alone: a BatchNorm on a
56x56 feature map at per-worker batch 2 averages 6,272 values per channel, while one after
global pooling, or inside a squeeze-and-excitation block (Hu et al., 2018), sees ``(N, C,
1, 1)`` and averages just 2. GroupNorm cannot rescue the second kind: with no spatial
extent, each of its groups holds only ``C/G`` values of one sample.

Shapes are recorded by forward pre-hooks during one forward pass of the sample input in
eval mode under ``torch.no_grad()``: no running statistic moves, no autograd graph is
built, and every module's ``training`` flag is restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from distnorm.errors import PolicyError
from distnorm.layers.norm_act import TORCH_BATCHNORMS, post_modules_of
from distnorm.norms import norm_of

# Normalization layers torch defines; anything else counts when its class name says
# "Norm" and it has no submodules (a leaf), so that e.g. timm's NormMlpClassifierHead, a
# container, is not mistaken for one while torchvision's FrozenBatchNorm2d is listed.
TORCH_NORMS = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


@dataclass(frozen=True)
class NormFact:
    """One normalization layer as the policy sees it.

    ``type_names`` are the names of its class and base classes (for ``by_type``
    overrides); ``is_batch_norm`` says whether it computes batch statistics that the
    policy may change; ``num_channels`` is C when known; ``input_shape`` is the
    smallest-per-channel shape it received from the sample input (``None`` without one,
    or when the sample never reached it) and ``sample_batch`` that input's batch size.
    ``own_forward``: a BatchNorm subclass that computes the normalization in a forward of its
    own (not torch's, not distnorm's, not a registered norm-act layer), which only SyncBN
    (calling that forward) keeps.
    """

    name: str
    type_name: str
    type_names: tuple[str, ...]
    is_batch_norm: bool
    num_channels: int | None
    track_running_stats: bool
    input_shape: tuple[int, ...] | None = None
    sample_batch: int | None = None
    own_forward: bool = False

    @property
    def spatial_size(self) -> int | None:
        """Positions per sample and channel (1 for ``(N, C)`` and ``(N, C, 1, 1)``)."""
        return None if self.input_shape is None else math.prod(self.input_shape[2:])

    @property
    def values_per_sample(self) -> float | None:
        """Values per channel that one sample of the *model's* batch contributes to the
        layer's input: the spatial size, times any factor by which the model folds other
        dimensions into the batch (video models fold time: ``(N*T, C, H, W)``)."""
        if self.input_shape is None or not self.sample_batch:
            return None
        per_channel = math.prod(self.input_shape) // max(self.input_shape[1], 1)
        return per_channel / self.sample_batch

    @property
    def is_frozen(self) -> bool:
        """A layer that already uses fixed statistics (torchvision's, detectron2's or
        distnorm's FrozenBatchNorm), recognized by name since they share no base class."""
        return "Frozen" in self.type_name


def is_normalization(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer for the purposes of a plan."""
    if isinstance(module, TORCH_NORMS) or post_modules_of(module) is not None:
        return True
    return "Norm" in type(module).__name__ and next(module.children(), None) is None


def has_own_forward(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm subclass whose forward distnorm cannot replace:
    see :attr:`NormFact.own_forward`."""
    return (
        isinstance(module, _BatchNorm)
        and type(module) not in TORCH_BATCHNORMS
        and norm_of(module) is None  # distnorm's layers: their forward is known
        and post_modules_of(module) is None
    )


def collect_facts(model: nn.Module, sample_input: Any = None) -> tuple[NormFact, ...]:
    """A :class:`NormFact` for every normalization layer of ``model``, in
    ``named_modules()`` order (a layer shared by several parents once, by its first name).

    ``sample_input`` (optional) is passed to ``model`` as ``model(x)`` for a tensor,
    ``model(*x)`` for a tuple or list and ``model(**x)`` for a mapping, on the model's
    device, to record each layer's input shape; its batch size can be anything (1 is
    cheapest), as shapes are scaled to the per-worker batch by the policy.
    """
    norms = [(name, m) for name, m in model.named_modules() if is_normalization(m)]
    shapes: dict[str, tuple[int, ...]] = {}
    sample_batch = None
    if sample_input is not None and norms:
        sample_batch = _batch_size(sample_input)
        shapes = _trace_input_shapes(model, norms, sample_input)
    return tuple(
        NormFact(
            name=name,
            type_name=type(module).__name__,
            type_names=tuple(cls.__name__ for cls in type(module).__mro__),
            is_batch_norm=isinstance(module, _BatchNorm),
            num_channels=_num_channels(module, shapes.get(name)),
            track_running_stats=bool(getattr(module, "track_running_stats", True)),
            input_shape=shapes.get(name),
            sample_batch=sample_batch,
            own_forward=has_own_forward(module),
        )
        for name, module in norms
    )


def _num_channels(module: nn.Module, shape: tuple[int, ...] | None) -> int | None:
    features = getattr(module, "num_features", None)
    if isinstance(features, int) and features > 0:  # a lazy BatchNorm has 0 until run
        return features
    return shape[1] if shape is not None and len(shape) >= 2 else None


def _batch_size(sample_input: Any) -> int:
    if isinstance(sample_input, Mapping):
        tensors = list(sample_input.values())
    elif isinstance(sample_input, (tuple, list)):
        tensors = list(sample_input)
    else:
        tensors = [sample_input]
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1:
            return int(tensor.shape[0])
    raise PolicyError(
        "the sample input holds no tensor with a batch dimension; pass a tensor, or a "
        "tuple/dict whose first tensor has the batch as its first dimension"
    )


def _trace_input_shapes(
    model: nn.Module, norms: list[tuple[str, nn.Module]], sample_input: Any
) -> dict[str, tuple[int, ...]]:
    """Each layer's input shape in one eval-mode, no-grad forward; when a layer runs
    several times, the call with the fewest values per channel (the worst case)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
                shape = tuple(args[0].shape)
                seen = shapes.get(name)
                if seen is None or _per_channel(shape) < _per_channel(seen):
                    shapes[name] = shape

        return hook

    modes = {module: module.training for module in model.modules()}
    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in norms]
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(sample_input, Mapping):
                model(**sample_input)
            elif isinstance(sample_input, (tuple, list)):
                model(*sample_input)
            else:
                model(sample_input)
    except Exception as error:
        raise PolicyError(
            f"running the sample input through {type(model).__name__} failed ({error}); "
            "pass an input the model accepts, or none (values per statistic are then unknown)"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return shapes


def _per_channel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) // max(shape[1], 1)
