"""Norm-act layers: a normalization followed by dropout and an activation, in one module.

timm builds most of its CNNs (EfficientNet, MobileNetV3, RegNet, CSPNet, ...) from
``BatchNormAct2d``: a BatchNorm subclass that computes ``act(drop(BN(x)))`` in its own
``forward``, with ``drop`` and ``act`` as submodules. No ``super().forward`` call lets a
synchronized BatchNorm slip in, so distnorm replaces the forward instead::

    y = post_k( ... post_1(N(x)))      N: the distnorm normalization; post_i: drop, act

:class:`NormAct` is that forward; :func:`register_norm_act` says which classes are norm-act
layers and which submodules follow the normalization. timm's ``BatchNormAct2d``,
``SyncBatchNormAct`` and ``FrozenBatchNormAct2d`` are registered by name, without importing
timm. A class is matched exactly: a subclass may change ``forward`` and must be registered
itself. Converted norm-act layers keep their submodules, so ``state_dict`` keys stay.

Cost: the normalization's, then the submodules', as in the original module.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

# torch's own BatchNorm classes: their forward is the plain BatchNorm transform. Other
# BatchNorm subclasses are norm-act layers when registered; else their forward is their own.
TORCH_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# Registered norm-act classes: "module.QualName" -> the submodules applied after the norm.
_POST_MODULES: dict[str, tuple[str, ...]] = {
    f"timm.layers.norm_act.{name}": ("drop", "act")
    for name in ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")
}


def _key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_norm_act(cls: type[nn.Module], post: Sequence[str] = ("drop", "act")) -> None:
    """Teach distnorm that ``cls`` computes ``post[-1](...post[0](BatchNorm(x)))``, its
    ``post`` submodules (each may be absent on an instance) applied after a BatchNorm of
    its ``num_features`` channels with its ``weight``, ``bias`` and running statistics.
    Its instances then convert under every norm and the policy, keeping those submodules."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_norm_act expects an nn.Module class, got {cls!r}")
    names = tuple(post)
    if not all(isinstance(name, str) and name.isidentifier() for name in names):
        raise ValueError(
            f"register_norm_act({cls.__qualname__}, post={post!r}): post must name the "
            "submodules (attribute names) applied after the normalization, in order"
        )
    _POST_MODULES[_key(cls)] = names


def post_modules_of(module: nn.Module) -> tuple[str, ...] | None:
    """The names of ``module``'s submodules that follow its normalization, when its class
    is a registered norm-act class (those it holds, in order); None otherwise."""
    names = _POST_MODULES.get(_key(type(module)))
    if names is None:
        return None
    return tuple(name for name in names if isinstance(module._modules.get(name), nn.Module))


class NormAct(nn.Module):
    """Mixin placed before a normalization layer's class: its forward, then the submodules
    named in ``post_modules`` (a class attribute of the combined class)."""

    post_modules: tuple[str, ...] = ()

    def forward(self, input: Tensor) -> Tensor:
        output = super().forward(input)
        for name in self.post_modules:
            output = self._modules[name](output)
        return output
