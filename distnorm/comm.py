"""Collectives for distnorm's layers: the only module that talks to ``torch.distributed``.

Layers hold an opaque process-group handle (``None`` meaning the default group) and ask
this module two things: how many ranks share their statistics, and to sum a packed
tensor across those ranks in place. Keeping every collective here means a layer's
communication can be read (and counted) in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from distnorm.errors import DistNormError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

Group = Optional["ProcessGroup"]


def is_initialized() -> bool:
    """True when a default process group exists in this process."""
    return dist.is_available() and dist.is_initialized()


def group_size(group: Group = None) -> int:
    """Number of ranks in ``group``; 1 when no process group is initialized.

    A layer whose group has one rank computes plain local BatchNorm and communicates
    nothing, which is what makes world size 1 and single-process debugging free.
    """
    if not is_initialized():
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
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def describe_group(group: Group = None) -> str:
    """Short human description of ``group`` for reports: ``"world (4 ranks)"``; just
    ``"world"`` before the default group exists (the layer will use it once it does)."""
    if not is_initialized():
        return "world"
    size = group_size(group)
    if group is None or group is dist.group.WORLD:
        return f"world ({size} ranks)"
    return f"{size} of {dist.get_world_size()} ranks"
