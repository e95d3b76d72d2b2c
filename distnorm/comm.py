"""Collectives for distnorm's layers: the only module that talks to ``torch.distributed``.

Layers hold an opaque process-group handle (``None`` meaning the default group) and ask
this module two things: how many ranks share their statistics, and to sum a packed
tensor across those ranks (:func:`all_reduce_sum`, which can also check that every rank
is in the same layer's same collective). Keeping every collective here means a layer's
communication can be read (and counted) in one place.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from distnorm.errors import DistNormError, SyncMismatchError

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


# --- The mismatch check ----------------------------------------------------------------
#
# A collective pairs the k-th all-reduce of every rank, whatever each rank meant by it. When
# ranks call synchronized layers differently (control flow that depends on the data, a
# layer called twice on one rank, one more batch on one rank), gloo and NCCL sum one
# layer's statistics into another's, or wait forever. So each collective of a synchronized
# layer carries, after its payload, a tag naming the collective: the layer (a hash of the
# qualified name convert_model gave it), the direction (shift / forward / backward) and
# the layer's training-call number. The identity is written as 8 base-16 digits, each sent
# as d_j = digit + 1 (1 to 16, never 0), followed by one more value, sum_j d_j^2. After the
# sum over W ranks, with d_rj rank r's digit j,
#
#     sum_j (sum_r d_rj)^2 == W * sum_r sum_j d_rj^2   iff every digit is equal on every rank
#
# (Cauchy-Schwarz per digit: W * sum_r d_rj^2 >= (sum_r d_rj)^2, with equality only for equal
# values), so every rank learns, from the very sum it already waits for, whether all ranks
# are in the same collective, and all of them raise together. Digits of at most 16 keep
# every sum an integer below 2^24, exact in fp32, for groups of up to 8192 ranks; a larger
# group is not checked. 9 values per collective, whatever the world size; no extra round trip.
#
# All collectives of a layer are padded to one size (2C + 1 values for C channels) so that
# two directions or calls of the same width compare tags instead of failing on sizes. Layers
# of different widths send payloads of different sizes: gloo then aborts the process whose
# buffer is the smaller ("Received data size doesn't match expected size"), and the other
# raises, from gloo or from this check: a tag summed over m < W ranks fails it, since m
# equal tags give m^2 * sum_j d_j^2 on the left and W * m * sum_j d_j^2 on the right. NCCL
# offers no such guarantee for different sizes.

# Which collective of a layer a tag names.
PHASES = ("shift", "forward", "backward")
_LAYER_ID_BITS = 18
_CALL_DIGITS = 3  # the call number modulo 16^3
_DIGITS = 8  # 5 for the layer id and phase (18 + 2 bits), 3 for the call number
TAG_SIZE = _DIGITS + 1
MAX_CHECKED_GROUP_SIZE = 2**24 // (_DIGITS * 16**2)  # 8192


def layer_id(key: str) -> int:
    """A layer's id in its tags: the same on every rank for the same ``key`` (crc32, unlike
    Python's ``hash``, is not salted per process)."""
    return zlib.crc32(key.encode()) & ((1 << _LAYER_ID_BITS) - 1)


class SyncTag(NamedTuple):
    """Which training call of which layer this rank is in: ``label`` (for messages, e.g.
    ``"SyncBatchNorm 'layer1.0.bn1'"``), ``layer`` (:func:`layer_id`), ``call`` (the
    layer's training-call number; 0 under torch.compile) and ``payload``, the number of
    values every collective of the layer sends before its tag (shorter payloads are padded
    with zeros to it)."""

    label: str
    layer: int
    call: int
    payload: int


def all_reduce_sum(
    parts: Sequence[Tensor],
    group: Group = None,
    tag: SyncTag | None = None,
    phase: str = "forward",
) -> Tensor:
    """The concatenation of ``parts`` (1-D, one dtype) summed over the ranks of ``group``,
    in one all-reduce.

    With ``tag``, the collective carries the tag of its ``phase`` (one of :data:`PHASES`;
    the payload padded to ``tag.payload`` values first) and every rank checks that all
    ranks sent the same one, raising :class:`~distnorm.errors.SyncMismatchError` on every
    rank otherwise. The check reads 9 summed values on the host (free on gloo, whose
    all-reduce returns on the host; a device synchronization with NCCL). Under
    ``torch.compile`` it is a device-side assert instead, which raises a ``RuntimeError``
    with the same message and breaks no graph.
    """
    ranks = 1 if tag is None else group_size(group)
    if tag is None or ranks > MAX_CHECKED_GROUP_SIZE:
        return all_reduce_sum_(torch.cat(parts), group)
    length = sum(part.numel() for part in parts)
    packed = torch.cat([*parts, _tag_values(tag, phase, tag.payload - length, parts[0])])
    all_reduce_sum_(packed, group)
    _check_tag(packed[-TAG_SIZE:], ranks, tag, phase, group)
    return packed[:length]


def _tag_values(tag: SyncTag, phase: str, padding: int, like: Tensor) -> Tensor:
    """``padding`` zeros, then ``[t_0 + 1, ..., t_7 + 1, sum_j (t_j + 1)^2]``: the layer id
    and phase in 5 digits, the call number (modulo 16^3) in 3; in ``like``'s dtype and
    device, made in one operation (it runs at every collective)."""
    site = (tag.layer << 2 | PHASES.index(phase)) << 4 * _CALL_DIGITS | tag.call % 16**_CALL_DIGITS
    digits = [((site >> (4 * j)) & 15) + 1 for j in range(_DIGITS)]
    return like.new_tensor([0] * padding + [*digits, sum(d * d for d in digits)])


def _check_tag(summed: Tensor, ranks: int, tag: SyncTag, phase: str, group: Group) -> None:
    if torch.compiler.is_compiling():
        values = summed.double()
        agreed = values[:-1].square().sum() == ranks * values[-1]
        torch._assert_async(agreed, _mismatch_message(tag, phase, group, call=None))
        return
    *digit_sums, square_sum = summed.tolist()
    if sum(d * d for d in digit_sums) != ranks * square_sum:
        raise SyncMismatchError(_mismatch_message(tag, phase, group, call=tag.call))


def _mismatch_message(tag: SyncTag, phase: str, group: Group, call: int | None) -> str:
    which = f"the {phase} collective" + ("" if call is None else f" of training call {call}")
    return (
        f"{tag.label}: rank {rank()} was in {which}, but the ranks of its sync group "
        f"({describe_group(group)}) were not all in the same one: some were in another "
        "synchronized layer, another call of this layer, or the other direction. Nothing "
        "was mixed: every rank raises this error, naming the layer it was in. Make every "
        "rank call the same synchronized layers, as many times, in the same order: the same "
        "control flow on every rank, no skipping a synchronized layer on some ranks (pass "
        "an empty batch through it instead), and, when ranks have different numbers of "
        "batches, distnorm.even_steps so that all take the same number of steps. "
        "check_sync=False turns this check off."
    )


# --- Uneven numbers of batches ---------------------------------------------------------

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
