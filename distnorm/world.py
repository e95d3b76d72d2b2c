"""The job's layout: world size, this rank, ranks per node, before any layer exists.

The policy needs these three numbers to plan sync groups (a group inside a node
all-reduces over NVLink or shared memory, one across nodes over the network). They come
from explicit arguments, else the initialized process group, else the launcher's
environment (torchrun, Open MPI, MPICH/PMI, SLURM), in that order. This module reads
them; :mod:`distnorm.comm` makes the groups and runs the collectives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

from distnorm.errors import DistNormError


@dataclass(frozen=True)
class WorldLayout:
    """How the ranks of a data-parallel job are laid out.

    ``ranks_per_node`` is ``None`` when nothing says (no argument, no launcher variable);
    the policy then puts no node constraint on sync groups. ``source`` says where the
    numbers came from, for the plan's log line.
    """

    world_size: int
    rank: int
    ranks_per_node: int | None
    source: str


# (launcher, world-size variable, rank variable, ranks-per-node variable), in the order
# they are trusted. Each launcher's node size is read only together with its own world
# size: under SLURM + torchrun, SLURM_NTASKS_PER_NODE counts torchrun agents (often 1),
# while torchrun's LOCAL_WORLD_SIZE counts the training processes on the node.
_LAUNCHERS = (
    ("torchrun", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"),
    ("Open MPI", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MPICH/PMI", "PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS"),
    ("SLURM", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_NTASKS_PER_NODE"),
)


def _env_int(variable: str) -> int | None:
    value = os.environ.get(variable)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistNormError(
            f"environment variable {variable}={value!r} is not an integer; fix or unset it, "
            "or pass world_size / ranks_per_node explicitly"
        ) from None


def world_layout(world_size: int | None = None, ranks_per_node: int | None = None) -> WorldLayout:
    """World size, this rank and ranks per node: explicit arguments win, then the
    initialized process group, then the launcher's environment (torchrun, Open MPI,
    MPICH/PMI, SLURM), then a single process.

    ``world_size`` given explicitly (planning for a job that is not this one) makes the
    rank 0 unless the process group or launcher describes a world of that same size.
    Raises :class:`DistNormError` for sizes below 1.
    """
    launcher = next(
        (
            (name, _env_int(size_var), _env_int(rank_var), _env_int(local_var))
            for name, size_var, rank_var, local_var in _LAUNCHERS
            if _env_int(size_var) is not None
        ),
        None,
    )
    if dist.is_available() and dist.is_initialized():
        detected = (dist.get_world_size(), dist.get_rank(), "process group")
    elif launcher is not None:
        detected = (launcher[1], launcher[2] or 0, f"{launcher[0]} environment")
    else:
        detected = (1, 0, "single process (no process group or launcher found)")

    size, rank_, source = detected
    if world_size is not None:
        if world_size != size:
            rank_ = 0
        size, source = world_size, "arguments"
    local = ranks_per_node
    if local is None and launcher is not None and launcher[1] == size:
        local = launcher[3]
    elif local is not None:
        source = "arguments" if world_size is not None else f"{source} and arguments"

    if size < 1:
        raise DistNormError(f"world size must be at least 1, got {size} (from {source})")
    if local is not None and local < 1:
        raise DistNormError(f"ranks per node must be at least 1, got {local} (from {source})")
    if not 0 <= rank_ < size:
        raise DistNormError(f"rank {rank_} is outside a world of {size} ranks (from {source})")
    return WorldLayout(size, rank_, local, source)
