"""Collectives for distnorm's layers: the only module that talks to ``torch.distributed``.

Layers hold an opaque process-group handle (``None`` meaning the default group) and ask
this module two things: how many ranks share their statistics, and to sum a packed
tensor across those ranks in place. Keeping every collective here means a layer's
communication can be read (and counted) in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from distnorm.errors import DistNormError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

Group = Optional["ProcessGroup | _ThisRankOnly"]


class _ThisRankOnly:
    """The "group" of a layer whose statistics stay on its own rank (a plan's local
    BatchChannelNorm or BatchGroupNorm): one rank, nothing communicated, no torch group
    to create. Pickles and copies as the one :data:`LOCAL`."""

    def __repr__(self) -> str:
        return "distnorm.comm.LOCAL"

    def __reduce__(self) -> str:
        return "LOCAL"


LOCAL = _ThisRankOnly()


def is_initialized() -> bool:
    """True when a default process group exists in this process."""
    return dist.is_available() and dist.is_initialized()


def group_size(group: Group = None) -> int:
    """Number of ranks in ``group``; 1 when no process group is initialized.

    A layer whose group has one rank computes plain local BatchNorm and communicates
    nothing, which is what makes world size 1 and single-process debugging free.
    """
    if group is LOCAL or not is_initialized():
        return 1
    size = dist.get_world_size(group)
    if size < 1:
        raise DistNormError(
            f"rank {dist.get_rank()} is not a member of the process group given to a "
            "distnorm layer; create the group on every rank and give each layer the group "
            "its own rank belongs to"
        )
    return size


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def all_reduce_sum_(tensor: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place and return it.

    Blocking on the host only as far as the backend requires (NCCL enqueues on the
    current stream; gloo completes on the host).
    """
    if group is not LOCAL:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def describe_group(group: Group = None) -> str:
    """Short human description of ``group`` for reports: ``"world (4 ranks)"``; just
    ``"world"`` before the default group exists (the layer will use it once it does)."""
    if group is LOCAL:
        return "this rank only"
    if not is_initialized():
        return "world"
    size = group_size(group)
    if group is None or group is dist.group.WORLD:
        return f"world ({size} ranks)"
    return f"{size} of {dist.get_world_size()} ranks"


# --- World layout and sync groups -------------------------------------------------------
#
# The normalization policy needs three numbers before any layer exists: how many ranks
# there are, which one this is, and how many share a node (a sync group inside a node
# all-reduces over NVLink/shared memory, one across nodes over the network). They come
# from explicit arguments, else the initialized process group, else the launcher's
# environment, in that order.


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
    if is_initialized():
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


# This rank's sync group of each size, and the default group they were made in (a new
# default group, after destroy_process_group and init_process_group, voids them).
_sync_groups: dict[int, Group] = {}
_sync_groups_made_in: object = None


def sync_group(group_size: int) -> Group:
    """This rank's group of ``group_size`` consecutive ranks, for synchronized layers.

    The first call for a size creates *every* group of that size on *every* rank, in
    rank order ({0..g-1}, {g..2g-1}, ...), as ``torch.distributed.new_group`` requires;
    so all ranks must make the same calls in the same order (distnorm creates the groups
    a plan needs once, up front, sorted by size). Later calls return the same object.
    Consecutive ranks share a node under torchrun, MPI and SLURM's default placement, so
    a size dividing the ranks per node keeps each group's all-reduce inside one node
    (the grouping of apex's ``create_syncbn_process_group`` and MLPerf's ``bn_group``).

    Returns ``None`` (the default group) when ``group_size`` is the world size, and
    :data:`LOCAL` when it is 1 (statistics on each rank alone, no torch group). Raises
    :class:`DistNormError` for a size that is not a divisor of the world size, before
    creating anything, so that every rank fails the same way instead of hanging.
    """
    world = dist.get_world_size() if is_initialized() else 1
    if group_size < 1 or group_size > world or world % group_size != 0:
        raise DistNormError(
            f"cannot make sync groups of {group_size} ranks in a world of {world}: the group "
            f"size must divide the world size (divisors of {world}: "
            f"{', '.join(str(d) for d in range(1, world + 1) if world % d == 0)})"
            + ("" if is_initialized() else "; no process group is initialized")
        )
    if group_size == world:
        return None
    if group_size == 1:
        return LOCAL
    global _sync_groups_made_in
    if _sync_groups_made_in is not dist.group.WORLD:
        _sync_groups.clear()
        _sync_groups_made_in = dist.group.WORLD
    if group_size not in _sync_groups:
        me = dist.get_rank()
        for start in range(0, world, group_size):
            members = list(range(start, start + group_size))
            group = dist.new_group(members)
            if me in members:
                _sync_groups[group_size] = group
    return _sync_groups[group_size]
