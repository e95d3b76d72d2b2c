"""Dispatch: kernel operations and host reads per layer in a steady training step.

On a GPU every operation a layer dispatches is a kernel launch of a few microseconds, and
every host read of a device value (``.item()``, ``bool()``, ``.tolist()``, a boolean mask)
waits for the device to drain. At the small per-GPU batches distnorm exists for, a layer's
time is the count of those as much as its passes over the data; counts are deterministic,
so they can be measured here, on CPU, exactly as they will be on CUDA (the CPU paths run the
same operations, except where noted in the table).

Counting: a ``TorchDispatchMode`` records every operation that reaches the dispatcher
during one training step (gradients set to None, forward, backward) after warm-up
steps, each layer alone, on 2 real gloo processes; views and allocations (``empty*``) are
not kernels and are not counted. Host reads are ``aten._local_scalar_dense``,
``aten.nonzero``, ``aten.lift_fresh`` and ``Tensor.tolist``. What a step costs once for the
whole model, whatever its number of layers (distnorm.health's report: one concatenation,
one zeroing, one host read), is counted apart.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import distnorm
from benchmarks import common
from distnorm import health

NAME = "dispatch"
LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "bn": nn.BatchNorm2d,
    "sync_bn": distnorm.SyncBatchNorm,
    "bgn": lambda channels: distnorm.BatchGroupNorm(channels, 8),
    "bcn": distnorm.BatchChannelNorm,
    "sync_bn_accum": lambda channels: distnorm.SyncBatchNorm(channels, accumulation_steps=4),
}
LABELS = {"bn": "nn.BatchNorm2d", "sync_bn": "SyncBatchNorm", "bgn": "BatchGroupNorm (G=8)",
          "bcn": "BatchChannelNorm",
          "sync_bn_accum": "SyncBatchNorm, accumulation_steps=4"}  # fmt: skip
# The budgets for a synchronized layer's steady step (forward + backward).
BUDGETS = {"sync_bn": 40, "bgn": 40, "bcn": 60, "sync_bn_accum": 60}
_ALLOCATIONS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}
_HOST_READS = {"_local_scalar_dense", "nonzero", "lift_fresh"}


class DispatchCounter(TorchDispatchMode):
    """Inside ``with``: ``ops`` counts kernel operations by name, ``host_reads`` the reads of
    tensor values on the host, ``report_ops``/``report_reads`` those made by
    distnorm.health's report (once per step, for the whole model)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.host_reads = 0
        self.report_ops = 0
        self.report_reads = 0
        self._in_report = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in _HOST_READS:
            self._count_read()
        elif not (func.is_view or name in _ALLOCATIONS):
            if self._in_report:
                self.report_ops += 1
            else:
                self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def _count_read(self) -> None:
        if self._in_report:
            self.report_reads += 1
        else:
            self.host_reads += 1

    @contextlib.contextmanager
    def counting(self) -> Iterator[DispatchCounter]:
        """This counter active, with ``Tensor.tolist`` (which never reaches the dispatcher on
        CPU) counted too, and the report's operations told apart."""
        tolist, report = torch.Tensor.tolist, health.Monitor.report
        counter = self

        def counted_tolist(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counter._count_read()
            return tolist(tensor, *args, **kwargs)

        def counted_report(monitor: health.Monitor, *args: Any, **kwargs: Any) -> None:
            counter._in_report = True
            try:
                report(monitor, *args, **kwargs)
            finally:
                counter._in_report = False

        torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign]
        health.Monitor.report = counted_report  # type: ignore[method-assign]
        try:
            with self:
                yield self
        finally:
            torch.Tensor.tolist = tolist  # type: ignore[method-assign]
            health.Monitor.report = report  # type: ignore[method-assign]

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_step(
    model: nn.Module, input: torch.Tensor, grad: torch.Tensor, warmup: int = 2
) -> DispatchCounter:
    """The operations and host reads of one steady training step of ``model``."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        input.grad = None
        model(input).backward(grad)

    for _ in range(warmup):
        step()
    counter = DispatchCounter()
    with counter.counting():
        step()
    return counter


def count_layers(
    rank: int, world_size: int, shape: Sequence[int], layers: Sequence[str]
) -> list[dict[str, Any]]:
    """Per layer and memory format, one steady step's counts on this rank."""
    torch.manual_seed(rank)
    records = []
    for layout in ("contiguous", "channels_last"):
        for name in layers:
            layer = LAYERS[name](shape[1]).train()
            x = torch.randn(*shape)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            counter = count_step(layer, x, torch.ones_like(x))
            records.append(
                {
                    "layer": name,
                    "layout": layout,
                    "ops": counter.total,
                    "host_reads": counter.host_reads,
                    "report_ops": counter.report_ops,
                    "report_reads": counter.report_reads,
                    "by_op": dict(counter.ops),
                }
            )
    return records


def _worker(rank: int, world_size: int, report: Any, shape: list[int], layers: list[str]) -> Any:
    return count_layers(rank, world_size, shape, layers)


def tables(records: list[dict[str, Any]]) -> str:
    rows = []
    for record in records:
        budget = BUDGETS.get(record["layer"])
        rows.append(
            [
                LABELS[record["layer"]],
                record["layout"],
                record["ops"],
                "-" if budget is None else budget,
                record["host_reads"],
                f"{record['report_ops']} ops, {record['report_reads']} read",
            ]
        )
    return (
        "Kernel operations and host reads per layer in one steady training step (forward +\n"
        "backward, 2 gloo ranks, views and allocations not counted); the last column is\n"
        "paid once per step for the whole model, whatever its number of layers.\n\n"
        + common.markdown_table(
            ["layer", "layout", "ops per step", "budget", "host reads", "per step, whole model"],
            rows,
        )
    )


def figure(records: list[dict[str, Any]]) -> Any:
    plt = common.pyplot()
    fig, axis = plt.subplots(figsize=(7, 3.5))
    layouts = ["contiguous", "channels_last"]
    names = list(dict.fromkeys(record["layer"] for record in records))
    for offset, layout in enumerate(layouts):
        values = [
            next(r["ops"] for r in records if r["layer"] == n and r["layout"] == layout)
            for n in names
        ]
        axis.bar([i + 0.4 * offset for i in range(len(names))], values, width=0.4, label=layout)
    axis.set_xticks([i + 0.2 for i in range(len(names))], [LABELS[n] for n in names])
    axis.set_ylabel("operations per training step")
    axis.set_title("Dispatched kernel operations per layer (steady step)")
    axis.legend()
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--shape", type=int, nargs=4, default=[4, 64, 16, 16], help="N C H W")
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    args = common.parse_arguments(parser, argv, tiny={"shape": [2, 16, 4, 4]})
    records = common.spawn(_worker, 2, args.shape, args.layers)[0]
    summary = {f"{r['layer']}/{r['layout']}": r["ops"] for r in records} | {
        "host_reads_per_layer": max(r["host_reads"] for r in records)
    }
    paths = common.write_results(
        NAME,
        args,
        argv,
        title="Dispatch: kernel operations and host reads per layer and step",
        records=records,
        summary=summary,
        tables=tables(records),
        figure=figure(records),
    )
    return {"records": records, "summary": summary, "paths": paths}


if __name__ == "__main__":
    main()
