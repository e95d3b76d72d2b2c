"""What the benchmark scripts share: timing, process spawning, the normalizations by name,
per-configuration caching, and the results files.

Every benchmark writes three files named after it into its results folder
(``benchmarks/results`` unless ``--out`` says otherwise):

* ``<name>.json``: the machine and versions, the command and configuration, every raw
  measurement and the numbers derived from them, so that a table can be recomputed;
* ``<name>.md``: the tables, headed by the date, machine and command, that
  ``docs/benchmarks.md`` is built from (:mod:`benchmarks.docs`);
* ``<name>.png``: the figure.

One timing discipline everywhere: warm-up calls are not timed; each timed call is measured
by itself (CUDA synchronized around it) and medians are reported, so that a stray slow call
moves nothing. What a ratio compares is timed in the same run, call for call in alternating
order, so that a change of the machine's speed during the run (another job, a clock
change) affects both sides alike instead of becoming part of the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from tqdm import tqdm

import distnorm

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPOSITORY = Path(__file__).resolve().parent.parent

# What each benchmark calls the normalizations it compares, and how they are labelled.
NORM_LABELS = {
    "bn": "local BN",
    "bn_collectives": "local BN + SyncBN's collectives",
    "sync_bn": "distnorm SyncBN",
    "sync_bn_group2": "distnorm SyncBN, groups of 2",
    "gn_ws": "GN+WS",
    "bcn": "BCN",
    "bgn": "BGN+WS",
    "bgn_no_ws": "BGN without WS",
    "policy": "policy default",
    "sync_bn_accum": "distnorm SyncBN + accumulation (+ WS)",
    "bn_accum": "each worker's own + accumulation (+ WS)",
    "sync_bn_accum_no_ws": "SyncBN + accumulation, no WS",
    "policy_accum": "policy + accumulation",
    "torch_sync_bn": "torch.nn.SyncBatchNorm",
}


# --- Command line --------------------------------------------------------------------


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark has (``--out``, ``--tiny``, ``--fresh``), with the
    script's module docstring as its description."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=_HelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a configuration that runs in seconds, for the CI smoke test; it replaces the "
        "sizes given or defaulted (numbers from it measure nothing worth reading)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="ignore the results an earlier, interrupted run of the same configuration "
        "left in OUT/tmp, and measure everything again",
    )
    return parser


def parse_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, tiny: Mapping[str, Any]
) -> argparse.Namespace:
    """Parse ``argv`` (the command line when None); ``--tiny`` replaces the options named
    in ``tiny`` by its values."""
    args = parser.parse_args(argv)
    if args.tiny:
        for option, value in tiny.items():
            setattr(args, option, value)
    return args


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """How to run this measurement again, for the results files."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python -m", module, *arguments])


# --- The machine -----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "distnorm": distnorm.__version__,
        "commit": _git_commit(),
    }


def describe_machine(info: Mapping[str, Any]) -> str:
    """One line: date, CPU, GPUs, versions."""
    gpus = ", ".join(info["gpus"]) if info["gpus"] else "no GPU"
    return (
        f"{info['date'][:10]}, {info['cpu']} ({info['cpu_cores']} logical cores), {gpus}; "
        f"torch {info['torch']}, distnorm {info['distnorm']} (commit {info['commit']})"
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    def git(*arguments: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPOSITORY), *arguments],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --- Timing ----------------------------------------------------------------------------


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a timer sees it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_timings(
    calls: Mapping[str, Callable[[], object]],
    *,
    device: torch.device | str,
    warmup: int,
    repeats: int,
    min_repeats: int = 3,
    budget_s: float | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls``, timed in rounds of one call each (order
    reversed every other round) after ``warmup`` untimed rounds.

    ``repeats`` rounds are timed, or fewer when ``budget_s`` is given and a round is slow:
    then as many as fit in about ``budget_s`` seconds, but at least ``min_repeats``.
    """
    names = list(calls)
    for _ in range(max(warmup, 1)):
        for name in names:
            calls[name]()
    synchronize(device)
    rounds = repeats
    if budget_s is not None:
        started = time.perf_counter()
        for name in names:
            calls[name]()
        synchronize(device)
        per_round = time.perf_counter() - started
        rounds = max(min_repeats, min(repeats, int(budget_s / max(per_round, 1e-9))))
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            synchronize(device)
            started = time.perf_counter()
            calls[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - started)
    return seconds


def median(values: Iterable[float]) -> float:
    return float(statistics.median(values))


def progress(total: float, description: str, unit: str = "it") -> tqdm:
    """The progress bar every benchmark shows (with its ETA), on stderr."""
    return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, smoothing=0.05)


# --- Normalizations by name ------------------------------------------------------------


def normalize(
    model: nn.Module, norm: str, per_worker_batch: int | None = None, accumulation_steps: int = 1
) -> nn.Module:
    """``model`` (with torch BatchNorms) converted to the normalization ``norm`` names
    (a key of :data:`NORM_LABELS`), in the current process group: "bn" leaves it as it
    is; "policy" lets :func:`distnorm.convert_model` plan for ``per_worker_batch``;
    "policy_accum" plans for it and ``accumulation_steps`` micro-batches per step;
    "sync_bn_accum" is SyncBN over the world pooling ``accumulation_steps`` micro-batches,
    "bn_accum" the same over each worker alone; "bgn_no_ws" and "sync_bn_accum_no_ws" are
    those without the Weight Standardization they have by default;
    "sync_bn_group2" synchronizes groups of 2 consecutive ranks (created here, on every
    rank, as ``new_group`` requires); "torch_sync_bn" is torch's own (CUDA only)."""
    if norm == "bn":
        return model
    if norm in ("policy", "policy_accum"):
        if per_worker_batch is None:
            raise ValueError("the policy's choice needs the per-worker batch size")
        return distnorm.convert_model(
            model, per_worker_batch_size=per_worker_batch, accumulation_steps=accumulation_steps
        )
    if norm in ("sync_bn_accum", "sync_bn_accum_no_ws", "bn_accum"):
        group = consecutive_group(1) if norm == "bn_accum" else None
        return distnorm.convert_model(
            model, norm="sync_bn", process_group=group, accumulation_steps=accumulation_steps,
            weight_standardization=False if norm == "sync_bn_accum_no_ws" else None,
        )  # fmt: skip
    if norm == "sync_bn_group2":
        return distnorm.convert_model(model, norm="sync_bn", process_group=consecutive_group(2))
    if norm == "torch_sync_bn":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if norm == "bgn_no_ws":
        return distnorm.convert_model(model, norm="bgn", weight_standardization=False)
    return distnorm.convert_model(model, norm=norm)


def consecutive_group(size: int) -> dist.ProcessGroup | None:
    """This rank's group of ``size`` consecutive ranks (None, the world, when ``size`` is
    the world size); every rank creates every group."""
    world = dist.get_world_size()
    if world % size:
        raise ValueError(f"groups of {size} ranks do not divide a world of {world}")
    if size == world:
        return None
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= dist.get_rank() < start + size:
            mine = group
    return mine


# --- Processes ---------------------------------------------------------------------------

Report = Callable[[Any], None]


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    threads: int = 1,
    on_report: Callable[[int, Any], None] | None = None,
    silence_timeout_s: float = 900.0,
) -> list[Any]:
    """``fn(rank, world_size, report, *args)`` on ``world_size`` spawned processes joined by
    a ``backend`` process group ("nccl" puts rank r on GPU r), each with ``threads`` torch
    threads; returns each rank's return value (plain Python data), rank by rank.

    ``report(item)`` sends ``item`` to this process at once, where ``on_report(rank, item)``
    receives it: progress and finished configurations arrive while the workers go on, so
    the parent can show them and cache them. A worker that raises stops every worker and
    raises here with its traceback; so does a worker that dies, or ``silence_timeout_s``
    seconds without any message (a hang). ``fn`` must be importable by name.
    """
    context = mp.get_context("spawn")
    messages = context.Queue()
    with tempfile.TemporaryDirectory(prefix="distnorm-benchmark-") as folder:
        store = os.path.join(folder, "store")
        processes = [
            context.Process(
                target=_rank_main,
                args=(fn, rank, world_size, backend, threads, store, messages, args),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        results: dict[int, Any] = {}
        silent_since = time.monotonic()
        try:
            while len(results) < world_size:
                try:
                    kind, rank, payload = messages.get(timeout=1.0)
                except queue.Empty:
                    dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"a worker died (exit code {dead[0]})") from None
                    if time.monotonic() - silent_since > silence_timeout_s:
                        raise TimeoutError(
                            f"no word from the workers for {silence_timeout_s} s"
                        ) from None
                    continue
                silent_since = time.monotonic()
                if kind == "error":
                    raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
                if kind == "report" and on_report is not None:
                    on_report(rank, payload)
                elif kind == "result":
                    results[rank] = payload
        finally:
            for process in processes:
                process.join(timeout=30 if len(results) == world_size else 0)
                if process.is_alive():
                    process.kill()
    return [results[rank] for rank in range(world_size)]


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    backend: str,
    threads: int,
    store: str,
    messages: Any,
    args: tuple,
) -> None:
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=f"file://{store}", rank=rank, world_size=world_size
        )
        result = fn(rank, world_size, lambda item: messages.put(("report", rank, item)), *args)
        messages.put(("result", rank, result))
    except BaseException:
        messages.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- Caching and results -----------------------------------------------------------------


class Cache:
    """Finished configurations' results, saved as they come in (in ``OUT/tmp``), so that
    an interrupted benchmark run resumes where it stopped; ``fresh=True`` starts over.

    A configuration is a JSON-able mapping holding everything its result depends on, so a
    changed setting is a different configuration, never a stale hit.
    """

    def __init__(self, out: Path, name: str, fresh: bool = False) -> None:
        self.path = out / "tmp" / f"{name}.cache.json"
        self._entries: dict[str, Any] = {}
        if self.path.exists() and not fresh:
            self._entries = json.loads(self.path.read_text())

    @staticmethod
    def _key(config: Mapping[str, Any]) -> str:
        return json.dumps(config, sort_keys=True)

    def __contains__(self, config: Mapping[str, Any]) -> bool:
        return self._key(config) in self._entries

    def get(self, config: Mapping[str, Any]) -> Any:
        return self._entries[self._key(config)]

    def put(self, config: Mapping[str, Any], result: Any) -> None:
        self._entries[self._key(config)] = result
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self._entries))
        os.replace(partial, self.path)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported when a figure is due)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right-aligned."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    name: str,
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    *,
    title: str,
    records: list[Any],
    summary: Mapping[str, Any],
    tables: str,
    figure: Any,
    module: str | None = None,
) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``args.out`` (with the
    options and the command line ``argv`` of ``benchmarks.<module>``, ``name`` by default,
    that produced them); return their paths. Results written to ``benchmarks/results``
    rebuild ``docs/benchmarks.md`` from its tables (:mod:`benchmarks.docs`)."""
    info = machine()
    out: Path = args.out
    command = command_line(f"benchmarks.{module or name}", argv)
    config = {option: value for option, value in vars(args).items() if option != "out"}
    out.mkdir(parents=True, exist_ok=True)
    paths = {suffix: out / f"{name}.{suffix}" for suffix in ("json", "md", "png")}
    payload = {
        "benchmark": name,
        "title": title,
        "command": command,
        "machine": info,
        "config": config,
        "summary": dict(summary),
        "records": records,
    }
    paths["json"].write_text(json.dumps(payload, indent=1, default=str) + "\n")
    paths["md"].write_text(
        f"### {title}\n\n"
        f"Measured {describe_machine(info)}.\n"
        f"Command: `{command}`\n\n"
        f"{tables.strip()}\n\n"
        f"![{title}]({name}.png)\n"
    )
    figure.savefig(paths["png"], dpi=110, bbox_inches="tight")
    pyplot().close(figure)
    if out.resolve() == RESULTS_DIR:
        from benchmarks import docs  # here, not at the top: it imports this module

        docs.write()
    return paths
