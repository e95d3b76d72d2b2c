"""Layer overhead: forward+backward time of each distnorm layer against the torch layer it
replaces, as a ratio measured in the same run.

Every case pairs a distnorm module with its torch counterpart on the same input (N, C, S, S)
and times one training call each (forward, then backward from a fixed output gradient,
with the input and parameter gradients computed) in alternating order; the figure is
median(distnorm) / median(torch). Single process, so SyncBatchNorm runs at world size 1:
its cost with communication is the scaling benchmark's business. bf16 means a bf16 input
under torch.autocast with fp32 parameters, as mixed-precision training runs.

Convolution blocks are skipped on CPU above --max-conv-gflop forward GFLOP (the ratio of
a big convolution tends to 1 and takes minutes to measure there); on CUDA every shape runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import distnorm
from benchmarks import common

NAME = "layer_overhead"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def group_count(channels: int) -> int:
    """GroupNorm's G = 32, reduced to a divisor of C with at least 2 channels per group."""
    return max(g for g in range(1, 33) if channels % g == 0 and channels // g >= 2)


def conv3x3(conv: type[nn.Conv2d], channels: int) -> nn.Conv2d:
    return conv(channels, channels, 3, padding=1, bias=False)


@dataclass(frozen=True)
class Case:
    """A distnorm module and the torch module it replaces, built for C channels."""

    label: str
    baseline: str
    build: Callable[[int], tuple[nn.Module, nn.Module]]
    is_conv: bool = False
    target: float | None = None  # the ceiling for the ratio on CPU


def against_batch_norm(label: str, layer: Callable[[int], nn.Module], **kwargs: Any) -> Case:
    return Case(label, "nn.BatchNorm2d", lambda c: (nn.BatchNorm2d(c), layer(c)), **kwargs)


CASES = {
    "sync_bn": against_batch_norm(
        "SyncBatchNorm (world size 1)", distnorm.SyncBatchNorm, target=1.1
    ),
    "bgn": against_batch_norm("BatchGroupNorm", distnorm.BatchGroupNorm, target=1.5),
    "bcn": against_batch_norm("BatchChannelNorm", distnorm.BatchChannelNorm, target=1.5),
    "frozen_bn": against_batch_norm("FrozenBatchNorm", distnorm.FrozenBatchNorm),
    "ws_conv": Case(
        "WSConv2d 3x3",
        "nn.Conv2d 3x3",
        lambda c: (conv3x3(nn.Conv2d, c), conv3x3(distnorm.WSConv2d, c)),
        is_conv=True,
    ),
    "conv_gn_ws": Case(
        "WSConv2d + GroupNorm",
        "nn.Conv2d + nn.GroupNorm",
        lambda c: (
            nn.Sequential(conv3x3(nn.Conv2d, c), nn.GroupNorm(group_count(c), c)),
            nn.Sequential(conv3x3(distnorm.WSConv2d, c), nn.GroupNorm(group_count(c), c)),
        ),
        is_conv=True,
        target=1.15,
    ),
    "conv_sync_bn": Case(
        "Conv2d + SyncBatchNorm (world size 1)",
        "nn.Conv2d + nn.BatchNorm2d",
        lambda c: (
            nn.Sequential(conv3x3(nn.Conv2d, c), nn.BatchNorm2d(c)),
            nn.Sequential(conv3x3(nn.Conv2d, c), distnorm.SyncBatchNorm(c)),
        ),
        is_conv=True,
    ),
}


def training_call(
    module: nn.Module, input: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> Callable[[], None]:
    """One forward+backward of ``module`` on ``input``, gradients set to None first."""
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    with autocast:
        grad = torch.randn_like(module(input))  # a fixed output gradient of the right shape

    def call() -> None:
        input.grad = None
        module.zero_grad(set_to_none=True)
        with autocast:
            output = module(input)
        output.backward(grad)

    return call


def measure(
    case: Case, shape: tuple[int, int, int], dtype: str, device: torch.device, args: Any
) -> dict[str, Any]:
    batch, channels, size = shape
    torch.manual_seed(0)
    baseline, candidate = (m.to(device).train() for m in case.build(channels))
    input = torch.randn(batch, channels, size, size, device=device, dtype=DTYPES[dtype])
    input.requires_grad_(True)
    seconds = common.interleaved_timings(
        {
            "baseline": training_call(baseline, input, DTYPES[dtype], device),
            "distnorm": training_call(candidate, input, DTYPES[dtype], device),
        },
        device=device,
        warmup=args.warmup,
        repeats=args.repeats,
        min_repeats=args.min_repeats,
        budget_s=args.budget,
    )
    baseline_ms = common.median(seconds["baseline"]) * 1e3
    distnorm_ms = common.median(seconds["distnorm"]) * 1e3
    return {
        "baseline_ms": baseline_ms,
        "distnorm_ms": distnorm_ms,
        "ratio": distnorm_ms / baseline_ms,
        "rounds": len(seconds["baseline"]),
        "baseline_ms_all": [s * 1e3 for s in seconds["baseline"]],
        "distnorm_ms_all": [s * 1e3 for s in seconds["distnorm"]],
    }


def conv_gflop(shape: tuple[int, int, int]) -> float:
    """Forward GFLOP of one 3x3 C->C convolution on (N, C, S, S)."""
    batch, channels, size = shape
    return 2 * batch * size * size * channels * channels * 9 / 1e9


def run(args: Any) -> list[dict[str, Any]]:
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    shapes = [(n, c, s) for s in args.size for c in args.channels for n in args.batch]
    plan = [
        (device, dtype, name, shape)
        for device in devices
        for dtype in args.dtypes
        for name in args.cases
        for shape in shapes
    ]
    cache = common.Cache(args.out, NAME, args.fresh)
    settings = {k: getattr(args, k) for k in ("warmup", "repeats", "min_repeats", "budget")}
    records = []
    with common.progress(len(plan), "layer overhead", "measurement") as bar:
        for device, dtype, name, shape in plan:
            case = CASES[name]
            record: dict[str, Any] = {
                "device": device,
                "dtype": dtype,
                "case": name,
                "layer": case.label,
                "baseline": case.baseline,
                "batch": shape[0],
                "channels": shape[1],
                "size": shape[2],
            }
            bar.set_postfix_str(f"{device} {dtype} {name} {shape}")
            if case.is_conv and device == "cpu" and conv_gflop(shape) > args.max_conv_gflop:
                record["skipped"] = (
                    f"convolution of {conv_gflop(shape):.0f} GFLOP > --max-conv-gflop on CPU"
                )
            else:
                config = {**record, **settings}
                if config not in cache:
                    cache.put(config, measure(case, shape, dtype, torch.device(device), args))
                record.update(cache.get(config))
            records.append(record)
            bar.update()
    return records


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per device, dtype and case: the median and range of the ratio over shapes, and
    how many shapes meet the case's target."""
    rows = []
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in records:
        if "ratio" in r:
            groups.setdefault((r["device"], r["dtype"], r["case"]), []).append(r["ratio"])
    for (device, dtype, name), ratios in groups.items():
        target = CASES[name].target
        rows.append(
            {
                "device": device,
                "dtype": dtype,
                "case": name,
                "median_ratio": common.median(ratios),
                "min_ratio": min(ratios),
                "max_ratio": max(ratios),
                "shapes": len(ratios),
                "target": target,
                "shapes_meeting_target": None
                if target is None
                else sum(ratio <= target for ratio in ratios),
            }
        )
    return rows


def device_dtype_order(column: tuple[str, str]) -> tuple[bool, int]:
    """CPU first, then dtypes in DTYPES' order (a set of strings iterates in a different
    order in every process)."""
    device, dtype = column
    return device != "cpu", list(DTYPES).index(dtype)


def tables(records: list[dict[str, Any]], summary: list[dict[str, Any]]) -> str:
    columns = sorted({(s["device"], s["dtype"]) for s in summary}, key=device_dtype_order)
    by_key = {(s["device"], s["dtype"], s["case"]): s for s in summary}
    rows = []
    for name, case in CASES.items():
        cells = []
        for device, dtype in columns:
            s = by_key.get((device, dtype, name))
            if s is None:
                cells.append("-")
                continue
            met = ""
            if s["target"] is not None and device == "cpu":
                met = f", {s['shapes_meeting_target']}/{s['shapes']} <= {s['target']}"
            cells.append(
                f"{s['median_ratio']:.2f} ({s['min_ratio']:.2f}-{s['max_ratio']:.2f}{met})"
            )
        if any(cell != "-" for cell in cells):
            target = "-" if case.target is None else f"<= {case.target}"
            rows.append([case.label, case.baseline, *cells, target])
    headers = ["distnorm", "against", *[f"{d} {t}" for d, t in columns], "target (CPU)"]
    summary_table = common.markdown_table(headers, rows)

    detail = common.markdown_table(
        ["device", "dtype", "distnorm", "N", "C", "S", "torch ms", "distnorm ms", "ratio"],
        [
            [
                r["device"],
                r["dtype"],
                r["layer"],
                r["batch"],
                r["channels"],
                r["size"],
                f"{r['baseline_ms']:.3f}" if "ratio" in r else "-",
                f"{r['distnorm_ms']:.3f}" if "ratio" in r else "-",
                f"{r['ratio']:.2f}" if "ratio" in r else r["skipped"],
            ]
            for r in records
        ],
    )
    return (
        "Forward+backward time, distnorm / torch, median over repeats; each cell the "
        "median over shapes (N x C x S x S), with the range and, on CPU, how many shapes "
        "meet the target.\n\n"
        f"{summary_table}\n\n<details><summary>Every shape</summary>\n\n{detail}\n\n</details>"
    )


def figure(records: list[dict[str, Any]]) -> Any:
    plt = common.pyplot()
    panels = sorted(
        {(r["device"], r["dtype"]) for r in records if "ratio" in r}, key=device_dtype_order
    )
    fig, axes = plt.subplots(
        1, max(len(panels), 1), figsize=(5.5 * max(len(panels), 1), 4.8), squeeze=False
    )
    names = [name for name in CASES if any(r["case"] == name for r in records)]
    sizes = sorted({r["size"] for r in records})
    batches = sorted({r["batch"] for r in records})
    colors = dict(zip(batches, plt.get_cmap("viridis")([0.1, 0.5, 0.85, 0.3, 0.7]), strict=False))
    markers = dict(zip(sizes, "os^Dv", strict=False))
    for ax, (device, dtype) in zip(axes[0], panels, strict=False):
        for x, name in enumerate(names):
            points = [
                r
                for r in records
                if (r["device"], r["dtype"], r["case"]) == (device, dtype, name) and "ratio" in r
            ]
            for i, r in enumerate(points):
                offset = (i - (len(points) - 1) / 2) * 0.5 / max(len(points), 1)
                ax.scatter(
                    x + offset,
                    r["ratio"],
                    color=colors[r["batch"]],
                    marker=markers[r["size"]],
                    s=22,
                    edgecolors="none",
                )
            target = CASES[name].target
            if target is not None and device == "cpu":
                ax.hlines(target, x - 0.35, x + 0.35, colors="tab:red", linestyles="--")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_yscale("log")
        plain = plt.FuncFormatter(lambda value, _: f"{value:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([CASES[n].label for n in names], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("time ratio, distnorm / torch")
        ax.set_title(f"{device}, {dtype}")
    handles = [
        plt.Line2D([], [], color=colors[b], marker="o", linestyle="", label=f"N={b}")
        for b in batches
    ] + [
        plt.Line2D([], [], color="black", marker=markers[s], linestyle="", label=f"{s}x{s}")
        for s in sizes
    ]
    handles.append(plt.Line2D([], [], color="tab:red", linestyle="--", label="target (CPU)"))
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper right")
    fig.suptitle("Layer overhead: forward+backward, distnorm / the torch layer it replaces")
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 8, 32], help="N values")
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 256], help="C values")
    parser.add_argument("--size", type=int, nargs="+", default=[56, 14], help="S values")
    parser.add_argument(
        "--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES), help="input dtypes"
    )
    parser.add_argument(
        "--devices", nargs="+", choices=["cpu", "cuda"], help="default: cpu, and cuda if present"
    )
    parser.add_argument(
        "--cases", nargs="+", choices=list(CASES), default=list(CASES), help="layers compared"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per measurement")
    parser.add_argument("--repeats", type=int, default=25, help="timed rounds at most")
    parser.add_argument("--min-repeats", type=int, default=5, help="timed rounds at least")
    parser.add_argument(
        "--budget", type=float, default=2.0, help="seconds of timed rounds per measurement"
    )
    parser.add_argument("--max-conv-gflop", type=float, default=8.0, help="see above (CPU)")
    args = common.parse_arguments(
        parser,
        argv,
        tiny={
            "batch": [2],
            "channels": [8],
            "size": [6],
            "dtypes": ["fp32", "bf16"],
            "devices": ["cpu"],
            "warmup": 1,
            "repeats": 3,
            "min_repeats": 1,
            "budget": 0.1,
        },
    )
    records = run(args)
    summary = summarize(records)
    paths = common.write_results(
        NAME,
        args,
        argv,
        title="Layer overhead: forward+backward time against the torch layer replaced",
        records=records,
        summary={"by_case": summary},
        tables=tables(records, summary),
        figure=figure(records),
    )
    return {"records": records, "summary": summary, "paths": paths}


if __name__ == "__main__":
    main()
