"""The conversion report: what :func:`distnorm.convert_model` did to a model, as a table.

Every layer it replaced (normalizations and standardized convolutions) with its original
class and sync group, and every other normalization layer, listed as left alone so that
the reader sees it was considered, not missed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from distnorm import comm
from distnorm.layers.sync_batchnorm import SyncBatchNorm
from distnorm.norms import norm_of
from distnorm.surgery import WS_CONV_OF
from distnorm.table import format_table

# Normalization layers that distnorm leaves as they are; listed in reports so that the
# user sees they were considered, not missed.
UNCONVERTED_NORMS = (nn.LayerNorm, nn.GroupNorm, _InstanceNorm, nn.LocalResponseNorm, nn.RMSNorm)


@dataclass(frozen=True)
class ConversionRow:
    """One normalization layer: where it is, what it was, what it is now."""

    name: str
    original: str
    converted: str
    sync_group: str
    accumulation_steps: int = 1


@dataclass(frozen=True)
class ConversionReport:
    """The normalization layers of a model after conversion; prints as a table."""

    rows: tuple[ConversionRow, ...]

    def __str__(self) -> str:
        if not self.rows:
            return "no normalization layers"
        return format_table(
            ("layer", "was", "now", "sync group"),
            [
                (
                    r.name,
                    r.original,
                    r.converted
                    if r.accumulation_steps == 1
                    else f"{r.converted} (k={r.accumulation_steps})",
                    r.sync_group,
                )
                for r in self.rows
            ],
        )

    @property
    def converted(self) -> tuple[ConversionRow, ...]:
        """The rows of layers that distnorm replaced."""
        return tuple(r for r in self.rows if r.original != r.converted)

    @property
    def standardized_convs(self) -> tuple[str, ...]:
        """Names of the convolutions given Weight Standardization."""
        ws_names = {cls.__name__ for cls in WS_CONV_OF.values()}
        return tuple(r.name for r in self.rows if r.converted in ws_names)


def conversion_report(model: nn.Module) -> ConversionReport:
    """What :func:`convert_model` did to ``model``: every layer it replaced (normalizations
    and standardized convolutions) with its original class and sync group, and every other
    normalization layer, marked as left alone."""
    rows = []
    for name, module in model.named_modules():
        name = name or "(root)"
        origin = getattr(module, "_distnorm_origin", None)
        if origin is not None or (isinstance(module, _BatchNorm) and norm_of(module)):
            synchronized = isinstance(module, SyncBatchNorm)
            rows.append(
                ConversionRow(
                    name,
                    origin.__name__ if origin is not None else "-",
                    type(module).__name__,
                    comm.describe_group(module.process_group) if synchronized else "-",
                    getattr(module, "accumulation_steps", 1) if synchronized else 1,
                )
            )
        elif isinstance(module, (_BatchNorm, *UNCONVERTED_NORMS)):
            kind = type(module).__name__
            rows.append(ConversionRow(name, kind, kind, "- (left alone)"))
    return ConversionReport(tuple(rows))
