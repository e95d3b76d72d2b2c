"""Communication: collectives and bytes per training step, counted on the real calls, and
an alpha-beta cost model fitted here that projects them to 1,024 ranks.

Counting: every ``torch.distributed`` collective is wrapped, in each spawned process, by a
counter that records its kind and payload while a training step of a small ResNet runs
(no DDP, so only the normalization layers communicate), the forward and the backward
counted apart. Payload bytes are the size of the result buffer (an all-gather's output, W
times its input); what crosses the wire depends on the backend's algorithm. The first
training step of a distnorm SyncBN layer makes one extra all-reduce to agree on its
variance shift, so the steady state is the third step. torch.nn.SyncBatchNorm refuses CPU
tensors: on CPU its rows are its documented scheme (forward: all_gather of 2C+1 values
from each of W ranks; backward: all_reduce of 2C), counted for real under --device cuda.

Cost model: all_reduce and all_gather latencies are measured over message sizes at each
world size, and fitted to the textbook models of Thakur, Rabenseifner & Gropp (2005,
"Optimization of Collective Communication Operations in MPICH", Sec. 4), for p ranks and
n payload bytes:

    all_reduce (Rabenseifner):       t = 2 log2(p) alpha + 2 (p-1)/p n beta
    all_gather (recursive doubling): t = log2(p) alpha + (p-1) n_rank beta

The PROJECTION applies them to ResNet-50's 53 BatchNorm layers at up to 1,024 ranks: a
model fitted to this machine's few ranks, not a measurement at scale.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import distnorm
from benchmarks import common
from distnorm.examples import small_resnet

NAME = "communication"
NORMS = ["sync_bn", "bcn", "bgn", "torch_sync_bn"]

# ResNet-50's BatchNorm layers (He et al. 2016, Table 1): the stem, then per bottleneck
# block C, C, 4C, plus one projection-shortcut BN per stage; 53 in all.
RESNET50_BN_CHANNELS = [64] + [
    c
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3))
    for c in [4 * width] + [width, width, 4 * width] * blocks
]
PROJECTED_WORLD_SIZES = [2**k for k in range(1, 11)]

# The collectives counted, and how many bytes each one's result holds.
_RESULT_BYTES: dict[str, Callable[..., int]] = {
    "all_reduce": lambda tensor, *a, **k: tensor.numel() * tensor.element_size(),
    "broadcast": lambda tensor, *a, **k: tensor.numel() * tensor.element_size(),
    "all_gather": lambda outputs, *a, **k: sum(t.numel() * t.element_size() for t in outputs),
    "all_gather_into_tensor": lambda out, *a, **k: out.numel() * out.element_size(),
    "all_gather_single": lambda out, *a, **k: out.numel() * out.element_size(),
    "_all_gather_base": lambda out, *a, **k: out.numel() * out.element_size(),
    "reduce_scatter_tensor": lambda out, *a, **k: out.numel() * out.element_size(),
}


class CollectiveCounter:
    """Wraps ``torch.distributed``'s collectives in this process while active, recording
    ``(phase, name, bytes)`` for each call; ``phase`` is whatever the caller set last."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.phase = ""
        self._originals: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> CollectiveCounter:
        for name, size in _RESULT_BYTES.items():
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._originals[name] = original

            @functools.wraps(original)
            def counted(*args: Any, _name=name, _size=size, _original=original, **kwargs: Any):
                self.calls.append((self.phase, _name, _size(*args, **kwargs)))
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def take(self) -> list[tuple[str, str, int]]:
        calls, self.calls = self.calls, []
        return calls


def norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (distnorm.SyncBatchNorm, nn.SyncBatchNorm))]


def count_and_time(rank: int, world_size: int, report: common.Report, config: dict) -> dict:
    """The spawned worker: counts, then latencies."""
    return {
        "count": count_collectives(rank, report, config),
        "latency": collective_latency(rank, world_size, report, config),
    }


def count_collectives(rank: int, report: common.Report, config: dict) -> dict:
    """Per norm: the collectives of each training step, and the layers' channels."""
    device = torch.device(f"cuda:{rank}" if config["device"] == "cuda" else "cpu")
    images = torch.randn(config["per_worker_batch"], 1, 8, 8, device=device)
    labels = torch.randint(0, 10, (config["per_worker_batch"],), device=device)
    result = {}
    for norm in config["norms"]:
        torch.manual_seed(0)
        model = common.normalize(small_resnet(width=config["width"]), norm).to(device)
        steps = []
        with CollectiveCounter() as counter:
            for _ in range(config["steps"]):
                counter.phase = "forward"
                loss = F.cross_entropy(model(images), labels)
                counter.phase = "backward"
                loss.backward()
                steps.append(counter.take())
        result[norm] = {
            "steps": steps,
            "channels": [m.num_features for m in norm_layers(model)],
            "groups": [getattr(m, "num_groups", None) for m in norm_layers(model)],
        }
        report(1)
    return result


def collective_latency(
    rank: int, world_size: int, report: common.Report, config: dict
) -> dict[str, dict[int, list[float]]]:
    """Seconds per all_reduce / all_gather of each payload size, per repetition."""
    device = torch.device(f"cuda:{rank}" if config["device"] == "cuda" else "cpu")
    seconds: dict[str, dict[int, list[float]]] = {"all_reduce": {}, "all_gather": {}}
    for floats in config["sizes"]:
        tensor = torch.zeros(floats, device=device)
        gathered = [torch.empty_like(tensor) for _ in range(world_size)]
        ops = {
            "all_reduce": functools.partial(dist.all_reduce, tensor),
            "all_gather": functools.partial(dist.all_gather, gathered, tensor),
        }
        for name, op in ops.items():
            times = []
            for repetition in range(config["warmup"] + config["repeats"]):
                dist.barrier()
                common.synchronize(device)
                started = time.perf_counter()
                op()
                common.synchronize(device)
                if repetition >= config["warmup"]:
                    times.append(time.perf_counter() - started)
            seconds[name][floats] = times
        report(1)
    return seconds


# --- Cost model ----------------------------------------------------------------------------


def model_terms(op: str, ranks: int, payload_bytes: float) -> tuple[float, float]:
    """(alpha coefficient, beta coefficient) of ``op`` for ``ranks`` ranks: all_reduce's
    payload is the reduced tensor, all_gather's the contribution of one rank."""
    if op == "all_reduce":
        return 2 * math.log2(ranks), 2 * (ranks - 1) / ranks * payload_bytes
    return math.log2(ranks), (ranks - 1) * payload_bytes


def fit(points: list[tuple[int, float, float]], op: str) -> dict[str, float]:
    """alpha (s) and beta (s/byte) minimizing the relative error over (ranks, bytes, s)."""
    terms = np.array([model_terms(op, p, n) for p, n, _ in points])
    measured = np.array([t for _, _, t in points])
    weighted = terms / measured[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(weighted, np.ones(len(points)), rcond=None)
    if alpha < 0 or beta < 0:  # keep the physically meaningful term alone
        column = 1 if alpha < 0 else 0
        value = np.linalg.lstsq(weighted[:, [column]], np.ones(len(points)), rcond=None)[0][0]
        alpha, beta = (0.0, value) if alpha < 0 else (value, 0.0)
    predicted = terms @ np.array([alpha, beta])
    return {
        "alpha_s": float(alpha),
        "beta_s_per_byte": float(beta),
        "median_relative_error": float(np.median(np.abs(predicted / measured - 1))),
    }


def predict(op: str, ranks: int, payload_bytes: float, params: dict[str, float]) -> float:
    a, b = model_terms(op, ranks, payload_bytes)
    return a * params["alpha_s"] + b * params["beta_s_per_byte"]


def project(
    params: dict[str, dict[str, float]], extra_forward: int, extra_backward: int
) -> list[dict[str, Any]]:
    """Per-step communication time and bytes for ResNet-50's BN layers, both schemes.

    distnorm's payloads include ``extra_*`` values per layer beyond 2C+1 / 2C, as counted
    on the small model (0 unless the layer sends more than its statistics)."""
    rows = []
    for ranks in PROJECTED_WORLD_SIZES:
        ours = torch_scheme = 0.0
        ours_bytes = torch_bytes = 0
        for c in RESNET50_BN_CHANNELS:
            forward, backward = 4 * (2 * c + 1 + extra_forward), 4 * (2 * c + extra_backward)
            ours += predict("all_reduce", ranks, forward, params["all_reduce"])
            ours += predict("all_reduce", ranks, backward, params["all_reduce"])
            torch_scheme += predict("all_gather", ranks, 4 * (2 * c + 1), params["all_gather"])
            torch_scheme += predict("all_reduce", ranks, 4 * 2 * c, params["all_reduce"])
            ours_bytes += forward + backward
            torch_bytes += ranks * 4 * (2 * c + 1) + 4 * 2 * c
        rows.append(
            {
                "world_size": ranks,
                "distnorm_ms": ours * 1e3,
                "torch_scheme_ms": torch_scheme * 1e3,
                "distnorm_bytes": ours_bytes,
                "torch_scheme_bytes": torch_bytes,
            }
        )
    return rows


# --- Counting summaries -------------------------------------------------------------------


def phase_totals(calls: list[list[Any]], phase: str) -> dict[str, Any]:
    mine = [c for c in calls if c[0] == phase]
    return {
        "collectives": len(mine),
        "kinds": sorted({c[1] for c in mine}),
        "bytes": sum(c[2] for c in mine),
    }


def torch_scheme_row(world_size: int, channels: list[int]) -> dict[str, Any]:
    """torch.nn.SyncBatchNorm's communication per step, from its algorithm."""
    return {
        "norm": "torch_sync_bn",
        "source": "scheme (torch's SyncBatchNorm refuses CPU tensors)",
        "world_size": world_size,
        "layers": len(channels),
        "steady": {
            "forward": {
                "collectives": len(channels),
                "kinds": ["all_gather"],
                "bytes": sum(world_size * 4 * (2 * c + 1) for c in channels),
            },
            "backward": {
                "collectives": len(channels),
                "kinds": ["all_reduce"],
                "bytes": sum(4 * 2 * c for c in channels),
            },
        },
    }


def fit_world_sizes(args: Any) -> list[int]:
    """The world sizes whose latencies the model is fitted to: on CPU, those with a core
    per process (a process waiting for a core measures the scheduler, not the transport),
    unless --fit-world-sizes says otherwise."""
    if args.fit_world_sizes:
        return args.fit_world_sizes
    if args.device == "cuda":
        return args.world_sizes
    own_core = [w for w in args.world_sizes if w <= (os.cpu_count() or 1)]
    return own_core or args.world_sizes[:1]


def run(args: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    cache = common.Cache(args.out, NAME, args.fresh)
    backend = "nccl" if args.device == "cuda" else "gloo"
    norms = [n for n in args.norms if n != "torch_sync_bn" or args.device == "cuda"]
    config = {
        "device": args.device,
        "per_worker_batch": args.per_worker_batch,
        "width": args.width,
        "steps": 3,
        "norms": norms,
        "sizes": [2**k for k in range(args.min_log2, args.max_log2 + 1, 2)],
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    todo = [w for w in args.world_sizes if {**config, "world_size": w} not in cache]
    units = len(norms) + len(config["sizes"])
    with common.progress(units * len(todo), "communication", "job") as bar:
        for world_size in todo:
            bar.set_postfix_str(f"W={world_size}")
            per_rank = common.spawn(
                count_and_time,
                world_size,
                config,
                backend=backend,
                threads=args.threads,
                on_report=lambda rank, n: bar.update(n) if rank == 0 else None,
            )
            latency = {  # a collective lasts until its slowest rank is done
                op: {
                    str(floats): [
                        max(ts)
                        for ts in zip(*(r["latency"][op][floats] for r in per_rank), strict=True)
                    ]
                    for floats in config["sizes"]
                }
                for op in per_rank[0]["latency"]
            }
            cache.put(
                {**config, "world_size": world_size},
                {"count": per_rank[0]["count"], "latency": latency},
            )

    counts, points = [], {"all_reduce": [], "all_gather": []}
    for w in args.world_sizes:
        measured = cache.get({**config, "world_size": w})
        counted = measured["count"]
        for norm, data in counted.items():
            steps = data["steps"]
            counts.append(
                {
                    "norm": norm,
                    "source": "counted",
                    "world_size": w,
                    "layers": len(data["channels"]),
                    "channels": data["channels"],
                    "groups": data["groups"],
                    "first": {p: phase_totals(steps[0], p) for p in ("forward", "backward")},
                    "steady": {p: phase_totals(steps[-1], p) for p in ("forward", "backward")},
                }
            )
        if args.device != "cuda":
            counts.append(torch_scheme_row(w, counted["sync_bn"]["channels"]))
        for op, by_size in measured["latency"].items():
            for floats, times in by_size.items():
                points[op].append((w, 4 * int(floats), common.median(times)))

    fitted = fit_world_sizes(args)
    params = {op: fit([q for q in p if q[0] in fitted], op) for op, p in points.items()}
    sync = [c for c in counts if c["norm"] == "sync_bn"]
    channels = sync[0]["channels"]
    extra_forward = round(
        (sync[0]["steady"]["forward"]["bytes"] / 4 - sum(2 * c + 1 for c in channels))
        / len(channels)
    )
    extra_backward = round(
        (sync[0]["steady"]["backward"]["bytes"] / 4 - sum(2 * c for c in channels)) / len(channels)
    )
    model = {
        "fitted_world_sizes": fitted,
        "fits": params,
        "points": points,
        "extra_values_per_layer": {"forward": extra_forward, "backward": extra_backward},
        "projection": project(params, extra_forward, extra_backward),
    }
    return counts, model


def targets(counts: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's two checks on distnorm SyncBN, as measured."""
    sync = [c for c in counts if c["norm"] == "sync_bn"]
    one_each = all(
        c["steady"][p]["collectives"] == c["layers"] and c["steady"][p]["kinds"] == ["all_reduce"]
        for c in sync
        for p in ("forward", "backward")
    )
    step_bytes = {
        c["world_size"]: c["steady"]["forward"]["bytes"] + c["steady"]["backward"]["bytes"]
        for c in sync
    }
    return {
        "one_all_reduce_per_layer_each_way": one_each,
        "sync_bn_bytes_per_step_by_world_size": step_bytes,
        "bytes_independent_of_world_size": len(set(step_bytes.values())) == 1,
    }


def collectives(totals: dict[str, Any]) -> str:
    if not totals["collectives"]:
        return "none"
    return f"{totals['collectives']} x {'/'.join(totals['kinds'])}"


def kilobytes(n: float) -> str:
    return f"{n / 1024:.1f}"


def tables(counts: list[dict[str, Any]], model: dict[str, Any]) -> str:
    count_rows = [
        [
            common.NORM_LABELS[c["norm"]] + ("" if c["source"] == "counted" else " (scheme)"),
            c["world_size"],
            c["layers"],
            collectives(c["steady"]["forward"]),
            kilobytes(c["steady"]["forward"]["bytes"]),
            collectives(c["steady"]["backward"]),
            kilobytes(c["steady"]["backward"]["bytes"]),
            "-" if "first" not in c else c["first"]["forward"]["collectives"],
        ]
        for c in counts
    ]
    counted = common.markdown_table(
        [
            "normalization",
            "processes",
            "norm layers",
            "forward collectives",
            "forward KiB",
            "backward collectives",
            "backward KiB",
            "forward collectives, first step",
        ],
        count_rows,
    )
    fits = common.markdown_table(
        ["collective", "alpha (us)", "beta (GB/s)", "median error of fit"],
        [
            [
                op,
                f"{p['alpha_s'] * 1e6:.1f}",
                "inf" if p["beta_s_per_byte"] == 0 else f"{1e-9 / p['beta_s_per_byte']:.2f}",
                f"{100 * p['median_relative_error']:.0f}%",
            ]
            for op, p in model["fits"].items()
        ],
    )
    projection = common.markdown_table(
        [
            "ranks",
            "distnorm SyncBN ms/step",
            "torch SyncBatchNorm scheme ms/step",
            "distnorm KiB/step",
            "torch scheme KiB/step",
        ],
        [
            [
                r["world_size"],
                f"{r['distnorm_ms']:.2f}",
                f"{r['torch_scheme_ms']:.2f}",
                kilobytes(r["distnorm_bytes"]),
                kilobytes(r["torch_scheme_bytes"]),
            ]
            for r in model["projection"]
            if r["world_size"] in (2, 8, 32, 128, 512, 1024)
        ],
    )
    return (
        "Collectives per training step of `small_resnet` (steady state: third step), "
        "normalization layers only, payload = result buffer bytes:\n\n"
        f"{counted}\n\nAlpha-beta fits to the all_reduce / all_gather latencies measured "
        f"here at {', '.join(map(str, model['fitted_world_sizes']))} processes:\n\n{fits}"
        "\n\n**Projection** (the fitted model, not a measurement) of the "
        "normalization communication per training step for ResNet-50's 53 BatchNorm "
        f"layers:\n\n{projection}"
    )


def figure(model: dict[str, Any]) -> Any:
    plt = common.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for op, marker in (("all_reduce", "o"), ("all_gather", "s")):
        points = model["points"][op]
        for ranks in sorted({p for p, _, _ in points}):
            mine = sorted((n, t) for p, n, t in points if p == ranks)
            xs = [n for n, _ in mine]
            line = left.plot(xs, [t * 1e6 for _, t in mine], marker, label=f"{op}, {ranks} ranks")[
                0
            ]
            predicted = [predict(op, ranks, n, model["fits"][op]) * 1e6 for n in xs]
            left.plot(xs, predicted, "-", color=line.get_color(), linewidth=0.8)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("payload bytes (all_gather: per rank)")
    left.set_ylabel("microseconds")
    left.set_title("measured here (points) and alpha-beta fit (lines)")
    left.legend(fontsize=7)
    rows = model["projection"]
    ranks = [r["world_size"] for r in rows]
    right.plot(ranks, [r["distnorm_ms"] for r in rows], "o-", label="distnorm SyncBN")
    right.plot(ranks, [r["torch_scheme_ms"] for r in rows], "s--", label="torch SyncBatchNorm")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("ranks")
    right.set_ylabel("ms per training step")
    right.set_title("PROJECTION: ResNet-50's 53 BN layers, fitted model")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4], help="process counts")
    parser.add_argument("--norms", nargs="+", choices=NORMS, default=NORMS, help="counted")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cpu: gloo; cuda: NCCL"
    )
    parser.add_argument("--per-worker-batch", type=int, default=4, help="images per process")
    parser.add_argument("--width", type=int, default=16, help="small_resnet's width")
    parser.add_argument("--min-log2", type=int, default=2, help="smallest payload: 2^k floats")
    parser.add_argument("--max-log2", type=int, default=20, help="largest payload: 2^k floats")
    parser.add_argument("--warmup", type=int, default=5, help="untimed collectives per size")
    parser.add_argument("--repeats", type=int, default=30, help="timed collectives per size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--fit-world-sizes",
        type=int,
        nargs="+",
        help="world sizes the cost model is fitted to (default: all on CUDA; on CPU those "
        "with a core per process)",
    )
    args = common.parse_arguments(
        parser,
        argv,
        tiny={"world_sizes": [2], "width": 4, "max_log2": 8, "warmup": 1, "repeats": 3},
    )
    counts, model = run(args)
    summary = {"targets": targets(counts), "fits": model["fits"]}
    paths = common.write_results(
        NAME,
        args,
        argv,
        title="Communication: collectives and bytes per step, and a projection to 1,024 ranks",
        records=counts,
        summary={**summary, "projection": model["projection"]},
        tables=tables(counts, model),
        figure=figure(model),
    )
    return {"counts": counts, "model": model, "summary": summary, "paths": paths}


if __name__ == "__main__":
    main()
