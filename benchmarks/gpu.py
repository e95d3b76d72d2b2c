"""GPU: the synchronized layers on a CUDA device, against torch's, in one run.

0. One device, no process group: forward+backward of SyncBatchNorm (torch's kernel there),
   BatchGroupNorm and BatchChannelNorm against nn.BatchNorm2d, per shape, dtype and memory
   format, timed call for call in alternating order (the GPU target: within 1.1x).
1. Two ranks sharing one GPU over gloo (NCCL refuses two ranks on a device; gloo stages CUDA
   tensors through the host, so times are host-bound and both layers pay the same
   transport): distnorm's SyncBatchNorm and torch.nn.SyncBatchNorm, forward+backward per
   shape, dtype and memory format, timed call for call in alternating order; and per layer
   and steady step, the CUDA kernels launched (torch.profiler) and the synchronizing calls
   made (torch.cuda.set_sync_debug_mode("warn"), counted), beside nn.BatchNorm2d's.
2. Memory bandwidth: a large bf16 channels-last layer's forward+backward through
   distnorm's own kernels (BatchGroupNorm, one GPU), its bytes read and written over its
   time, against a device-to-device copy of the same tensor (what the device sustains).

The layers' forward+backward at world size 1 against nn.BatchNorm2d is
``benchmarks.layer_overhead --device cuda`` (``benchmarks/gpu.sh`` runs both). With
``--device cpu`` (or ``--tiny``) the same code runs on the CPU: the CUDA-only counts are
left out; it is how CI checks this script without a GPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

import distnorm
from benchmarks import common
from benchmarks.dispatch import DispatchCounter

NAME = "gpu_sync"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "nn.BatchNorm2d": nn.BatchNorm2d,
    "distnorm SyncBatchNorm": distnorm.SyncBatchNorm,
    "torch.nn.SyncBatchNorm": nn.SyncBatchNorm,
    "distnorm BatchGroupNorm": lambda channels: distnorm.BatchGroupNorm(channels, 8),
    "distnorm BatchChannelNorm": distnorm.BatchChannelNorm,
}


def _batch(shape: Sequence[int], dtype: torch.dtype, layout: str, device: str) -> torch.Tensor:
    x = torch.randn(*shape, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(True)


def _training_call(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    grad = torch.randn_like(x)

    def call() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)

    return call


def kernels_and_syncs(call: Callable[[], None], device: str) -> dict[str, int]:
    """CUDA kernels launched and synchronizing calls made by one steady ``call`` (CUDA
    only), and the operations it dispatched (any device)."""
    for _ in range(3):
        call()
    counter = DispatchCounter()
    with counter.counting():
        call()
    counts = {"dispatched_ops": counter.total, "host_reads": counter.host_reads}
    if device != "cuda":
        return counts
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        call()
        torch.cuda.synchronize()
    counts["cuda_kernels"] = sum(
        1 for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counts["synchronizations"] = sum("synchronizing" in str(w.message) for w in caught)
    return counts


def _configurations(config: dict[str, Any]) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """Each shape, dtype and memory format measured, and an input of it."""
    for shape in config["shapes"]:
        for dtype in config["dtypes"]:
            for layout in ("contiguous", "channels_last"):
                where = {"shape": shape, "dtype": dtype, "layout": layout}
                yield where, _batch(shape, DTYPES[dtype], layout, config["device"])


def _two_ranks(rank: int, world_size: int, report: Any, config: dict[str, Any]) -> Any:
    device = config["device"]
    records = []
    for record, x in _configurations(config):
        calls = {
            name: _training_call(make(x.size(1)).to(device).train(), x)
            for name, make in LAYERS.items()
            if device == "cuda" or name != "torch.nn.SyncBatchNorm"  # CPU: refused
        }
        try:
            seconds = common.interleaved_timings(
                calls, device=device, warmup=config["warmup"], repeats=config["repeats"]
            )
            record["ms"] = {n: common.median(s) * 1e3 for n, s in seconds.items()}
        except RuntimeError as error:  # e.g. a layer the backend cannot run
            record["error"] = f"{type(error).__name__}: {error}"[:300]
        record["counts"] = {name: kernels_and_syncs(call, device) for name, call in calls.items()}
        records.append(record)
        report(1)
    return records


ONE_DEVICE = ["nn.BatchNorm2d", "distnorm SyncBatchNorm", "distnorm BatchGroupNorm",
              "distnorm BatchChannelNorm"]  # fmt: skip


def one_device(config: dict[str, Any], bar: Any) -> list[dict[str, Any]]:
    """Per shape, dtype and memory format: each layer's forward+backward ms on one device,
    no process group, and its ratio to nn.BatchNorm2d's in the same rounds."""
    device = config["device"]
    records = []
    for record, x in _configurations(config):
        calls = {
            name: _training_call(LAYERS[name](x.size(1)).to(device).train(), x)
            for name in ONE_DEVICE
        }
        seconds = common.interleaved_timings(
            calls, device=device, warmup=config["warmup"], repeats=config["repeats"]
        )
        record["ms"] = {name: common.median(s) * 1e3 for name, s in seconds.items()}
        record["ratio"] = {
            n: record["ms"][n] / record["ms"]["nn.BatchNorm2d"] for n in ONE_DEVICE[1:]
        }
        records.append(record)
        bar.update()
    return records


def bandwidth(config: dict[str, Any]) -> dict[str, Any]:
    """GB/s of a large bf16 channels-last BatchGroupNorm training call (distnorm's own
    kernels), counting the passes its kernels make, against a device copy."""
    device = config["device"]
    shape = config["bandwidth_shape"]
    x = _batch(shape, torch.bfloat16, "channels_last", device)
    layer = distnorm.BatchGroupNorm(shape[1], 32).to(device).train()
    copy_target = torch.empty_like(x)
    seconds = common.interleaved_timings(
        {
            "layer": _training_call(layer, x),
            "copy": lambda: copy_target.copy_(x.detach()),
        },
        device=device,
        warmup=config["warmup"],
        repeats=config["repeats"],
    )
    tensor_bytes = x.numel() * x.element_size()
    # Passes over an activation-sized tensor: forward, moments (read) and normalize (read,
    # write); backward, the eval-mode kernel (read g and x, write dx), the correction
    # (read x, write) and its add (read two, write one).
    passes = 3 + 3 + 2 + 3
    layer_s, copy_s = common.median(seconds["layer"]), common.median(seconds["copy"])
    layer_gbps = passes * tensor_bytes / layer_s / 1e9
    copy_gbps = 2 * tensor_bytes / copy_s / 1e9
    return {
        "shape": shape,
        "passes": passes,
        "layer_ms": layer_s * 1e3,
        "copy_ms": copy_s * 1e3,
        "layer_GBps": layer_gbps,
        "copy_GBps": copy_gbps,
        "fraction_of_copy": layer_gbps / copy_gbps,
    }


def tables(
    single: list[dict[str, Any]], records: list[dict[str, Any]], band: dict[str, Any]
) -> str:
    names = list(LAYERS)
    single_rows = [
        [f"{'x'.join(map(str, r['shape']))} {r['dtype']} {r['layout']}",
         f"{r['ms']['nn.BatchNorm2d']:.3f}"]
        + [f"{r['ms'][n]:.3f} ({r['ratio'][n]:.2f}x)" for n in ONE_DEVICE[1:]]
        for r in single
    ]  # fmt: skip
    timing_rows, count_rows = [], []
    for record in records:
        where = f"{'x'.join(map(str, record['shape']))} {record['dtype']} {record['layout']}"
        ms = record.get("ms", {})
        ours, theirs = ms.get("distnorm SyncBatchNorm"), ms.get("torch.nn.SyncBatchNorm")
        timing_rows.append(
            [where]
            + [f"{ms[n]:.3f}" if n in ms else "-" for n in names]
            + [f"{ours / theirs:.2f}" if ours and theirs else record.get("error", "-")]
        )
        for name, counts in record["counts"].items():
            count_rows.append(
                [where, name]
                + [
                    counts.get(k, "-")
                    for k in ("dispatched_ops", "cuda_kernels", "synchronizations")
                ]
            )
    return (
        "#### One device, no process group: forward+backward ms (median) and ratio to "
        "nn.BatchNorm2d\n\n"
        + common.markdown_table(["shape", *ONE_DEVICE], single_rows)
        + "\n\n#### Two ranks on one device: forward+backward ms per layer (median), and distnorm "
        "SyncBatchNorm / torch.nn.SyncBatchNorm\n\n"
        + common.markdown_table(["shape", *names, "ours / torch's"], timing_rows)
        + "\n\n#### Per layer and steady step: operations dispatched, CUDA kernels, "
        "synchronizing calls\n\n"
        + common.markdown_table(
            ["shape", "layer", "dispatched ops", "CUDA kernels", "synchronizations"], count_rows
        )
        + f"\n\n#### Memory bandwidth, bf16 {'x'.join(map(str, band['shape']))} channels-last "
        f"BatchGroupNorm training call ({band['passes']} passes)\n\n"
        + common.markdown_table(
            ["", "ms", "GB/s"],
            [
                [
                    "BatchGroupNorm forward+backward",
                    f"{band['layer_ms']:.3f}",
                    f"{band['layer_GBps']:.0f}",
                ],
                [
                    "device copy of the same tensor",
                    f"{band['copy_ms']:.3f}",
                    f"{band['copy_GBps']:.0f}",
                ],
                ["fraction of the copy's bandwidth", "", f"{band['fraction_of_copy']:.0%}"],
            ],
        )  # fmt: skip
    )


def figure(records: list[dict[str, Any]]) -> Any:
    plt = common.pyplot()
    fig, axis = plt.subplots(figsize=(8, 3.5))
    timed = [r for r in records if "ms" in r]
    labels = [f"{'x'.join(map(str, r['shape']))}\n{r['dtype']} {r['layout'][:8]}" for r in timed]
    for offset, name in enumerate(n for n in LAYERS if any(n in r["ms"] for r in timed)):
        values = [r["ms"].get(name, 0.0) for r in timed]
        axis.bar([i + 0.15 * offset for i in range(len(timed))], values, width=0.15, label=name)
    axis.set_xticks([i + 0.3 for i in range(len(timed))], labels, fontsize=7)
    axis.set_ylabel("ms per forward+backward")
    axis.set_title("Two ranks on one device (gloo): time per layer")
    axis.legend(fontsize=7)
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--shapes", type=int, nargs="+", default=[8, 64, 56, 56, 32, 256, 14, 14],
        help="N C H W, repeated",
    )  # fmt: skip
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--bandwidth-shape", type=int, nargs=4, default=[32, 256, 56, 56])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    args = common.parse_arguments(
        parser,
        argv,
        tiny={"device": "cpu", "shapes": [2, 8, 4, 4], "dtypes": ["fp32"],
              "bandwidth_shape": [2, 32, 4, 4], "warmup": 1, "repeats": 2},
    )  # fmt: skip
    shapes = [args.shapes[i : i + 4] for i in range(0, len(args.shapes), 4)]
    config = {
        "device": args.device, "shapes": shapes, "dtypes": args.dtypes,
        "bandwidth_shape": args.bandwidth_shape, "warmup": args.warmup, "repeats": args.repeats,
    }  # fmt: skip
    total = len(shapes) * len(args.dtypes) * 2
    with common.progress(total, "one device", unit="configuration") as bar:
        single = one_device(config, bar)
    with common.progress(total, "two ranks on one device", unit="configuration") as bar:
        records = common.spawn(
            _two_ranks, 2, config, on_report=lambda rank, _: bar.update(rank == 0)
        )[0]
    band = bandwidth(config)
    paths = common.write_results(
        NAME,
        args,
        argv,
        title="GPU: synchronized layers against torch's, kernels, synchronizations, bandwidth",
        records=[{"section": "one_device", **r} for r in single]
        + [{"section": "two_ranks", **r} for r in records],
        summary={
            "bandwidth": band,
            "worst_ratio_one_device": {
                n: max(r["ratio"][n] for r in single) for n in ONE_DEVICE[1:]
            },
        },
        tables=tables(single, records, band),
        figure=figure(records),
        module="gpu",
    )
    return {"one_device": single, "records": records, "bandwidth": band, "paths": paths}


if __name__ == "__main__":
    main()
