"""Which convolutions feed a normalization layer: where Weight Standardization belongs.

Qiao et al. (2019, arXiv:1903.10520, Sec. 3) standardize a convolution's weight and leave
the affine scale to "normalization layers such as BN or GN" that "will normalize this
convolutional layer again"; the authors' README says to replace only "convolutional layers
that are followed by normalization layers". A convolution feeding the network's output
(a classifier head, a residual branch's end without a norm) would lose its scale for
good. This module finds the convolutions that are safe to standardize.

Two methods, the first that works:

* ``"torch.fx"``: :func:`torch.fx.symbolic_trace`-style tracing of ``forward``, with every
  convolution and every module of the asked norm types kept as one node (not traced into,
  so subclasses such as distnorm's own layers or timm's ``BatchNormAct2d`` count as what
  they are). A convolution is linked when its output node is a direct input (positional
  or keyword) of a norm's node: this follows the real data flow through residual
  additions, shared modules and modules called several times, and does not link a conv
  whose output passes through anything first (``bn(relu(conv(x)))``).
* ``"module order"``: the fallback when ``forward`` cannot be traced symbolically, e.g.
  Python control flow on tensor values (``if x.sum() > 0:``) or calls fx cannot proxy.
  Modules are taken in registration order (``named_modules()``), convolutions and norms
  as units, other modules down to their leaves, and a convolution is linked to the unit
  registered right after it when that is a norm of the asked types whose ``num_features``
  (or ``num_channels``) equals the convolution's ``out_channels``. This is the order of
  the usual ``Sequential`` / ``conv1, bn1, conv2, bn2`` definitions, but it is a guess about
  the data flow, and ``reason`` says why it had to be made.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from torch import fx, nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class ConvNormLinks:
    """The result of :func:`conv_norm_links`.

    ``pairs``: ``(conv, norm)`` qualified names (as ``named_modules()`` gives them), one per
    convolution feeding a norm, each pair once, in the order found. ``method``:
    ``"torch.fx"`` or ``"module order"``. ``reason``: why tracing failed ("" when it did not).
    """

    pairs: tuple[tuple[str, str], ...]
    method: str
    reason: str = ""

    @property
    def convs(self) -> tuple[str, ...]:
        """The convolutions that feed at least one norm, each once, in the order found."""
        return tuple(dict.fromkeys(conv for conv, _ in self.pairs))


class _UnitTracer(fx.Tracer):
    """fx tracer that keeps convolutions and the asked norms as single call_module nodes."""

    def __init__(self, norm_types: tuple[type, ...]) -> None:
        super().__init__()
        self.units = CONV_TYPES + tuple(norm_types)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.units) or super().is_leaf_module(m, module_qualified_name)


def conv_norm_links(model: nn.Module, norm_types: tuple[type, ...]) -> ConvNormLinks:
    """Which ``nn.Conv1d/2d/3d`` modules of ``model`` (subclasses included) send their
    output directly into which module of one of ``norm_types``.

    Traces ``model.forward`` with torch.fx; if tracing raises (data-dependent control flow,
    untraceable calls), falls back to registration order and says so in ``reason``. See
    the module docstring for what each method links. Norms applied functionally
    (``F.batch_norm``) are not modules and are not seen by either.
    """
    norm_types = tuple(norm_types)
    try:
        graph = _UnitTracer(norm_types).trace(model)
    except Exception as error:  # any tracing failure means: no reliable data flow
        message = str(error).strip().splitlines()
        detail = f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
        return ConvNormLinks(
            _links_by_module_order(model, norm_types),
            "module order",
            f"torch.fx could not trace {type(model).__name__}.forward ({detail}); "
            "linked each convolution to the norm registered right after it instead",
        )
    return ConvNormLinks(_links_by_data_flow(model, graph, norm_types), "torch.fx")


def _links_by_data_flow(
    model: nn.Module, graph: fx.Graph, norm_types: tuple[type, ...]
) -> tuple[tuple[str, str], ...]:
    """(conv target, norm target) for each conv node that is a direct input of a norm
    node, first occurrence first."""
    found: dict[tuple[str, str], None] = {}  # an ordered set
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), norm_types):
            continue
        for source in node.all_input_nodes:
            if source.op == "call_module" and isinstance(
                model.get_submodule(source.target), CONV_TYPES
            ):
                found[(source.target, node.target)] = None
    return tuple(found)


def _links_by_module_order(
    model: nn.Module, norm_types: tuple[type, ...]
) -> tuple[tuple[str, str], ...]:
    """(conv, norm) where the norm, of matching width, is the unit registered right after
    the convolution."""
    units: list[tuple[str, nn.Module]] = []
    inside_unit: str | None = None  # the unit whose submodules are being skipped
    for name, module in model.named_modules():
        if inside_unit is not None and (inside_unit == "" or name.startswith(inside_unit + ".")):
            continue
        inside_unit = None
        if isinstance(module, (*CONV_TYPES, *norm_types)):
            units.append((name, module))
            inside_unit = name
        elif next(module.children(), None) is None:
            units.append((name, module))

    links = []
    for (name, module), (following_name, following) in pairwise(units):
        if not isinstance(module, CONV_TYPES) or not isinstance(following, norm_types):
            continue
        width = getattr(following, "num_features", getattr(following, "num_channels", None))
        if width == module.out_channels:
            links.append((name, following_name))
    return tuple(links)
