"""Run a function on W real processes joined by a gloo process group.

The tests of anything that communicates go through here: real processes, real gloo
collectives, nothing mocked. Each worker's return value (tensors, numbers, containers of
them) comes back to the parent, which compares them against a single-process float64
reference. A worker that raises fails the test with its traceback; a hang fails it at the
deadline instead of freezing the run.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 120.0,
) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each call in its own process with
    the default process group initialized (gloo by default; "nccl" puts rank r on GPU r).
    ``fn`` must be importable by name (a module-level function): processes are spawned."""
    with tempfile.TemporaryDirectory(prefix="distnorm-test-") as folder:
        context = mp.start_processes(
            _worker,
            args=(fn, world_size, backend, folder, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = timeout_s
        while not context.join(timeout=1.0):
            deadline -= 1.0
            if deadline <= 0:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks ran past {timeout_s} s")
        return [torch.load(os.path.join(folder, f"{r}.pt")) for r in range(world_size)]


def _worker(
    rank: int, fn: Callable[..., Any], world_size: int, backend: str, folder: str, args: tuple
) -> None:
    torch.set_num_threads(1)  # W processes share 2 cores here
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # torch warns, and carries on, when autograd records a collective it cannot
    # differentiate ("may lead to silently incorrect behavior"): here that is a failure.
    warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
    dist.init_process_group(
        backend,
        init_method=f"file://{os.path.join(folder, 'store')}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(folder, f"{rank}.pt"))
        # Every rank done before any tears the group down: gloo aborts a process whose
        # peer closes the connections under one of its threads.
        dist.barrier()
    finally:
        dist.destroy_process_group()


# Every public collective (and barrier): anything a layer might use shows up in the log.
COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "gather",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
)


@dataclass(frozen=True)
class CollectiveCall:
    """One call of a ``torch.distributed`` collective: its name, and the number of values,
    bytes and dtype of the tensors passed to it."""

    name: str
    numel: int
    nbytes: int
    dtype: torch.dtype | None


@contextlib.contextmanager
def recorded_collectives() -> Iterator[list[CollectiveCall]]:
    """Inside a worker: a list that fills with a :class:`CollectiveCall` for each collective
    called in the block. Every call still goes through to the real backend; the functions
    of ``torch.distributed`` are wrapped, not replaced, and restored on exit."""
    log: list[CollectiveCall] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def recording(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            log.append(
                CollectiveCall(
                    name,
                    sum(t.numel() for t in tensors),
                    sum(t.numel() * t.element_size() for t in tensors),
                    tensors[0].dtype if tensors else None,
                )
            )
            return originals[name](*args, **kwargs)

        return call

    for name in COLLECTIVES:
        setattr(dist, name, recording(name))
    try:
        yield log
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
