"""Uneven epochs: every rank takes the same number of steps, padding with empty batches.

Synchronized layers meet unequal control flow at the end of an epoch, when one rank has a
batch more than another: :func:`even_steps` pads the short ranks with empty batches,
which the synchronized layers take exactly, at one extra all-reduce of 2 values a step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from distnorm.comm import LOCAL, Group, all_reduce_sum_, describe_group, is_initialized
from distnorm.errors import DistNormError

Batch = TypeVar("Batch")
_EXHAUSTED = object()


def even_steps(
    batches: Iterable[Batch],
    group: Group = None,
    empty: Callable[[Batch | None], Batch] | None = None,
) -> Iterator[Batch]:
    """This rank's ``batches``, then empty batches for as long as any other rank of
    ``group`` still has one, so that every rank takes the same number of training steps.

    The end of an epoch, when one rank has a batch more than another, is where
    synchronized layers meet unequal control flow: the rank with the extra batch enters a
    collective that no other rank joins. Synchronized layers take empty batches exactly
    (an empty rank joins each collective and adds nothing), so padding the short ranks'
    epochs with empty batches keeps the statistics those of the real samples, and the
    layers' call counts equal. Each step costs one extra all-reduce of 2 values.

    ``empty(last_batch)`` builds the empty batch (``last_batch`` is None on a rank that got
    no batch at all); by default every tensor in the last batch, in tuples, lists and
    dicts, sliced to its first 0 samples. The training step must accept it: a loss that is
    0 on an empty batch (a mean over 0 samples is NaN, which would reach every rank
    through the gradients), e.g. ``loss = criterion(out, y) if len(y) else out.sum() * 0``.
    Leaving the loop early on one rank (``break``) recreates the problem; every rank must
    run it to its end. With DDP this plays the role of ``DistributedDataParallel.join``,
    which shadows only DDP's own collectives and so cannot be used with synchronized
    layers; DDP's gradient average then counts the empty ranks, as ``join`` does by default
    (``divide_by_initial_world_size=True``).
    """
    if group is LOCAL or not is_initialized():
        yield from batches
        return
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    iterator = iter(batches)
    last: Any = None
    while True:
        batch = next(iterator, _EXHAUSTED)
        exhausted = batch is _EXHAUSTED
        cannot_pad = exhausted and last is None and empty is None
        # [ranks with a batch, ranks that have none and cannot make an empty one]
        flags = torch.tensor([float(not exhausted), float(cannot_pad)], device=device)
        busy, stuck = all_reduce_sum_(flags, group).tolist()
        if busy == 0:
            return
        if stuck:
            raise DistNormError(
                f"even_steps: {int(stuck)} rank(s) of {describe_group(group)} got no batch at "
                "all and cannot build an empty one to step with; pass empty=... (a function "
                "of None returning an empty batch) or give every rank at least one batch"
            )
        if exhausted:
            batch = (empty or _empty_like)(last)
        else:
            last = batch
        yield batch


def _empty_like(batch: Any) -> Any:
    """``batch`` with every tensor sliced to its first 0 samples (dim 0)."""
    if isinstance(batch, Tensor):
        return batch[:0]
    if isinstance(batch, Mapping):
        return type(batch)({key: _empty_like(value) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_make"):  # a namedtuple
        return batch._make(_empty_like(item) for item in batch)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_empty_like(item) for item in batch)
    return batch
