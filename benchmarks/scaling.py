"""Scaling: training-step throughput of a small ResNet at 1, 2 and 4 processes, per
normalization, and its scaling efficiency against 1 process.

Weak scaling, as data-parallel training runs: every process keeps the same per-worker batch,
so W processes train on W times as many images per step. Each process runs the whole
training step (forward, cross-entropy, backward, SGD) on a fixed synthetic batch of
its own; at 2 processes and more the model is wrapped in DistributedDataParallel, at 1 it is
not. A step's time is the slowest rank's, timed step by step after warm-up; the figure is
the median. Efficiency is throughput(W) / (W x throughput(1)) for the same normalization.

Gloo on CPU (each process gets --threads threads: a machine with fewer cores than
processes x threads measures its oversubscription, not the normalization); NCCL with one
GPU per process when --device cuda, where torch.nn.SyncBatchNorm runs as a baseline too
(it refuses CPU tensors).

"local BN + SyncBN's collectives" is the floor a synchronized BatchNorm cannot go under: the
model with local BatchNorm, plus, at every BatchNorm, the all-reduces distnorm's SyncBN
makes there (one in forward, one in backward, of its payload size) on a buffer of zeros.
SyncBN's step over this floor is what distnorm's own code costs; the floor over local BN
is what the transport costs on the machine measured.

The collectives' cost is fixed per layer, so SyncBN's ratio to local BN is that cost over
the step's compute, and the image size sets the compute. The default, 64x64, is a step of
about 130 ms on one CPU core; ``--image-size 32`` (about 30 ms) shows the end where a
small model's step is mostly waiting for the transport.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from benchmarks import common
from distnorm import comm
from distnorm.examples import small_resnet

NAME = "scaling"
NORMS = [
    "bn",
    "bn_collectives",
    "sync_bn",
    "sync_bn_group2",
    "gn_ws",
    "bcn",
    "bgn",
    "torch_sync_bn",
]
# SyncBatchNorm's collective of a layer of C channels: 2C + 1 values and the mismatch tag
# (on by default; the backward's has the same size).


class _AllReduceEachWay(torch.autograd.Function):
    """Identity that all-reduces a buffer of ``size`` zeros in forward and in backward."""

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, size: int) -> torch.Tensor:  # type: ignore[override]
        ctx.size = size
        dist.all_reduce(input.new_zeros(size))
        return input.view_as(input)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        dist.all_reduce(grad.new_zeros(ctx.size))
        return grad, None


class _WithCollectives(nn.Module):
    """A local BatchNorm followed by the collectives distnorm's SyncBN would make there."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.norm = norm
        self.size = 2 * norm.num_features + 1 + comm.TAG_SIZE

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _AllReduceEachWay.apply(self.norm(input), self.size)


def with_sync_bn_collectives(model: nn.Module) -> nn.Module:
    """``model`` with each BatchNorm followed by SyncBN's collectives (the floor)."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, _WithCollectives(child))
        else:
            with_sync_bn_collectives(child)
    return model


def runs_at(norm: str, world_size: int, device: str) -> bool:
    """Whether ``norm`` is measured at ``world_size``: groups of 2 only where they are not
    the world (at 1 and 2 processes they are SyncBN over the world), torch's SyncBatchNorm
    only on CUDA."""
    if norm == "sync_bn_group2":
        return world_size > 2 and world_size % 2 == 0
    if norm == "bn_collectives":
        return world_size > 1
    return norm != "torch_sync_bn" or device == "cuda"


def step_times(rank: int, world_size: int, report: common.Report, config: dict) -> dict:
    """Every norm's per-step seconds on this rank (the spawned worker)."""
    device = torch.device(f"cuda:{rank}" if config["device"] == "cuda" else "cpu")
    generator = torch.Generator().manual_seed(rank)
    size, batch = config["image_size"], config["per_worker_batch"]
    images = torch.randn(batch, 1, size, size, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(device)
    seconds = {}
    for norm in config["norms"]:
        torch.manual_seed(0)
        if norm == "bn_collectives":
            model = with_sync_bn_collectives(small_resnet(width=config["width"]))
        else:
            model = common.normalize(small_resnet(width=config["width"]), norm)
        model = model.to(device)
        trained = model
        if world_size > 1:
            trained = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        seconds[norm] = []
        for step in range(config["warmup"] + config["steps"]):
            common.synchronize(device)
            started = time.perf_counter()
            loss = F.cross_entropy(trained(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            common.synchronize(device)
            if step >= config["warmup"]:
                seconds[norm].append(time.perf_counter() - started)
            if rank == 0:
                report(1)
    return seconds


def run(args: Any) -> list[dict[str, Any]]:
    cache = common.Cache(args.out, NAME, args.fresh)
    settings = {
        k: getattr(args, k)
        for k in ("device", "per_worker_batch", "image_size", "width", "steps", "warmup")
    }
    settings["threads"] = args.threads
    todo = {}
    for world_size in args.world_sizes:
        norms = [
            n
            for n in args.norms
            if runs_at(n, world_size, args.device)
            and {**settings, "world_size": world_size, "norm": n} not in cache
        ]
        if norms:
            todo[world_size] = norms
    total = sum(len(n) for n in todo.values()) * (args.warmup + args.steps)
    with common.progress(total, "scaling", "step") as bar:
        for world_size, norms in todo.items():
            bar.set_postfix_str(f"W={world_size}")
            per_rank = common.spawn(
                step_times,
                world_size,
                {**settings, "norms": norms},
                backend="nccl" if args.device == "cuda" else "gloo",
                threads=args.threads,
                on_report=lambda _rank, steps: bar.update(steps),
            )
            for norm in norms:
                # A step lasts until its slowest rank is done.
                slowest = [max(times) for times in zip(*(r[norm] for r in per_rank), strict=True)]
                cache.put(
                    {**settings, "world_size": world_size, "norm": norm},
                    {"step_ms_all": [s * 1e3 for s in slowest]},
                )
    records = []
    for world_size in args.world_sizes:
        for norm in args.norms:
            config = {**settings, "world_size": world_size, "norm": norm}
            if config in cache:
                step_ms = common.median(cache.get(config)["step_ms_all"])
                records.append(
                    {
                        **config,
                        **cache.get(config),
                        "step_ms": step_ms,
                        "images_per_s": world_size * args.per_worker_batch / step_ms * 1e3,
                    }
                )
    derive(records)
    return records


def derive(records: list[dict[str, Any]]) -> None:
    """Add scaling efficiency (against the same model at 1 process; SyncBN's for groups of
    2, the same model there) and the step time relative to local BN at the same W."""
    step = {(r["norm"], r["world_size"]): r["step_ms"] for r in records}
    for r in records:
        single = step.get((r["norm"], 1))
        if single is None and r["norm"] == "sync_bn_group2":
            single = step.get(("sync_bn", 1))
        r["efficiency"] = None if single is None else single / r["step_ms"]
        local = step.get(("bn", r["world_size"]))
        r["vs_local_bn"] = None if local is None else r["step_ms"] / local


def tables(records: list[dict[str, Any]]) -> str:
    sizes = sorted({r["world_size"] for r in records})
    by_key = {(r["norm"], r["world_size"]): r for r in records}
    norms = [n for n in NORMS if any(r["norm"] == n for r in records)]

    def cell(norm: str, world_size: int, text: Any) -> str:
        r = by_key.get((norm, world_size))
        return "-" if r is None else text(r)

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.0f}%"

    times = common.markdown_table(
        ["normalization", *[f"{w} proc. ms/step (efficiency)" for w in sizes]],
        [
            [
                common.NORM_LABELS[n],
                *[
                    cell(n, w, lambda r: f"{r['step_ms']:.1f} ({percent(r['efficiency'])})")
                    for w in sizes
                ],
            ]
            for n in norms
        ],
    )
    relative = common.markdown_table(
        ["normalization", *[f"{w} proc." for w in sizes]],
        [
            [
                common.NORM_LABELS[n],
                *[
                    cell(
                        n,
                        w,
                        lambda r: "-" if r["vs_local_bn"] is None else f"{r['vs_local_bn']:.2f}x",
                    )
                    for w in sizes
                ],
            ]
            for n in norms
        ],
    )
    first = records[0]
    return (
        f"Per-worker batch {first['per_worker_batch']}, {first['image_size']}x"
        f"{first['image_size']} images, `small_resnet(width={first['width']})`, "
        f"{first['device']}, {first['threads']} thread(s) per process; median over "
        f"{first['steps']} steps of the slowest rank's step time.\n\n"
        f"{times}\n\nStep time relative to local BN at the same number of processes "
        f"(target at 2 processes on CPU: SyncBN <= 1.3x):\n\n{relative}\n\n"
        f"distnorm SyncBN relative to local BN + SyncBN's collectives (what distnorm's own "
        f"code adds to the transport's cost): {floor_ratios(records)}"
    )


def floor_ratios(records: list[dict[str, Any]]) -> str:
    step = {(r["norm"], r["world_size"]): r["step_ms"] for r in records}
    ratios = [
        f"{step[('sync_bn', w)] / step[('bn_collectives', w)]:.2f}x at {w} processes"
        for w in sorted({r["world_size"] for r in records})
        if ("sync_bn", w) in step and ("bn_collectives", w) in step
    ]
    return ", ".join(ratios) or "not measured"


def figure(records: list[dict[str, Any]]) -> Any:
    plt = common.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = sorted({r["world_size"] for r in records})
    norms = [n for n in NORMS if any(r["norm"] == n for r in records)]
    for norm in norms:
        points = sorted((r["world_size"], r["images_per_s"]) for r in records if r["norm"] == norm)
        left.plot(*zip(*points, strict=True), marker="o", label=common.NORM_LABELS[norm])
    local = {r["world_size"]: r["images_per_s"] for r in records if r["norm"] == "bn"}
    if 1 in local:
        left.plot(sizes, [local[1] * w for w in sizes], "k:", label="ideal (local BN x W)")
    left.set_xlabel("processes")
    left.set_ylabel("images / s (all processes)")
    left.set_xticks(sizes)
    left.set_title("training throughput")
    left.legend(fontsize=7)
    width = 0.8 / max(len(norms), 1)
    for i, norm in enumerate(norms):
        points = [
            (r["world_size"], r["vs_local_bn"])
            for r in records
            if r["norm"] == norm and r["vs_local_bn"] is not None
        ]
        xs = [sizes.index(w) + (i - (len(norms) - 1) / 2) * width for w, _ in points]
        right.bar(xs, [v for _, v in points], width, label=common.NORM_LABELS[norm])
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.axhline(1.3, color="tab:red", linestyle="--", linewidth=0.8, label="target (SyncBN, 2)")
    right.set_xticks(range(len(sizes)))
    right.set_xticklabels([f"{w} proc." for w in sizes])
    right.set_ylabel("step time / local BN step time")
    right.set_title("cost relative to local BN")
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.argument_parser(__doc__)
    parser.add_argument(
        "--world-sizes", type=int, nargs="+", default=[1, 2, 4], help="process counts"
    )
    parser.add_argument("--norms", nargs="+", choices=NORMS, default=NORMS, help="compared")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cpu: gloo; cuda: NCCL"
    )
    parser.add_argument("--per-worker-batch", type=int, default=8, help="images per process")
    parser.add_argument("--image-size", type=int, default=64, help="side of the images")
    parser.add_argument("--width", type=int, default=32, help="small_resnet's width")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = common.parse_arguments(
        parser,
        argv,
        tiny={
            "world_sizes": [1, 2],
            "per_worker_batch": 2,
            "image_size": 8,
            "width": 4,
            "steps": 3,
            "warmup": 1,
        },
    )
    records = run(args)
    paths = common.write_results(
        NAME,
        args,
        argv,
        title="Scaling: training-step throughput by number of processes",
        records=records,
        summary={
            "sync_bn_vs_local_bn": {
                r["world_size"]: r["vs_local_bn"] for r in records if r["norm"] == "sync_bn"
            },
            "collective_floor_vs_local_bn": {
                r["world_size"]: r["vs_local_bn"] for r in records if r["norm"] == "bn_collectives"
            },
        },
        tables=tables(records),
        figure=figure(records),
    )
    return {"records": records, "paths": paths}


if __name__ == "__main__":
    main()
