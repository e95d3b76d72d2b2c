"""Collectives for distnorm's layers: the one module through which they reach other ranks.

Layers hold an opaque process-group handle (``None`` meaning the default group) and ask
this module two things: how many ranks share their statistics, and to sum a packed buffer
across those ranks (:class:`SyncChannel`, which also checks, on the device, that every rank
is in the same layer's same collective). Keeping every collective here means a layer's
communication can be read (and counted) in one place.

Statistics go to the process group a layer is given: the default group, or the sync
groups a plan makes. With NCCL that group's communicator is DDP's too, so a backward
all-reduce of a layer can queue behind gradient buckets already launched; a group made for
the statistics alone (``convert_model(model, process_group=dist.new_group(ranks))``, on
every rank) gives them their own. Whether that should be the default wants a measurement on
two or more GPUs, which this project has not had: it is not, for now.

The job's layout (:mod:`distnorm.world`) and uneven epochs (:mod:`distnorm.uneven`) live
beside it; their names stay importable from here.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from distnorm.errors import DistNormError, SyncMismatchError
from distnorm.world import _LAUNCHERS as _LAUNCHERS
from distnorm.world import WorldLayout as WorldLayout
from distnorm.world import _env_int as _env_int
from distnorm.world import world_layout as world_layout

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


# --- Checked collectives ---------------------------------------------------------------
#
# A collective pairs the k-th all-reduce of every rank, whatever each rank meant by it. When
# ranks call synchronized layers differently (control flow that depends on the data, a
# layer called twice on one rank, one more batch on one rank), gloo and NCCL sum one
# layer's statistics into another's, or wait forever. So each collective of a synchronized
# layer carries, after its payload, a tag naming the layer and the direction (shift /
# forward / backward): the code's TAG_BITS bits b_j, then their complements 1 - b_j, each
# sent as 0.0 or 1.0. Summed over W ranks, bit j becomes S_j and its complement W - S_j, and
#
#     sum_j S_j * (W - S_j) == 0   iff every rank sent the same code,
#
# since each term is a product of two non-negative integers, zero exactly when bit j is 0
# on every rank or 1 on every rank. A sum of non-negative terms is zero iff each term is, in
# floating point too (nothing cancels), so fp32 decides it exactly for any group size: one
# matrix-vector product on the device, no host read. Equal codes in every position imply
# the same layer and direction at every earlier position too, hence the same call count:
# calls need no number. A layer's code is a 18-bit hash of its name (qualified by
# convert_model; class, width and construction index for layers built directly).
#
# The outcome accumulates in the layer's flags (distnorm.health) and gates its statistics
# on the device; distnorm.health reads every layer's flags once per step and raises
# SyncMismatchError there. A layer's first collective (the shift) is checked on the host
# at once: it is not part of a steady step, and it catches ranks that start to disagree.
#
# Every collective of a layer has one size (payload + count + tag) so that two directions
# of the same width compare tags instead of failing on sizes. Layers of different widths
# send payloads of different sizes: gloo then aborts the process whose buffer is the
# smaller ("Received data size doesn't match expected size"), and the other raises, from
# gloo or from this check. NCCL offers no such guarantee for different sizes.

PHASES = ("shift", "forward", "backward")
_LAYER_ID_BITS = 18
TAG_BITS = _LAYER_ID_BITS + 2  # the layer id, then the phase
TAG_SIZE = 2 * TAG_BITS  # the bits, then their complements
MAX_CHECKED_GROUP_SIZE = 2**24  # every summed bit an exact fp32 integer


def layer_id(key: str) -> int:
    """A layer's id in its tags: the same on every rank for the same ``key`` (crc32, unlike
    Python's ``hash``, is not salted per process)."""
    return zlib.crc32(key.encode()) & ((1 << _LAYER_ID_BITS) - 1)


def tag_code(layer: int, phase: str) -> list[float]:
    """The tag a collective of ``phase`` of layer ``layer`` carries: its code's bits, then
    their complements."""
    code = layer << 2 | PHASES.index(phase)
    bits = [float(code >> j & 1) for j in range(TAG_BITS)]
    return bits + [1.0 - bit for bit in bits]


def _disagreement(summed_tag: list[float]) -> float:
    """``sum_j S_j (W - S_j)`` of a summed tag read on the host: 0 iff the ranks agreed."""
    return sum(s * c for s, c in zip(summed_tag[:TAG_BITS], summed_tag[TAG_BITS:], strict=True))


class SyncChannel:
    """The collectives of one synchronized layer, on one device and dtype.

    Each collective all-reduces one buffer ``[payload (P values) | count | tag]`` in place:
    the layer writes its payload into a :meth:`new_buffer` with ``out=`` operations;
    :meth:`all_reduce` writes the count and the tag behind it (one copy from a persistent
    tail), all-reduces, and adds the tag check to ``flags`` (one matrix-vector product).
    Tails and flags are allocated once and updated in place, so a captured CUDA graph
    replays them.

    ``flags`` holds, per :attr:`FLAGS`, what the layer's collectives found since they were
    last read (:mod:`distnorm.health`): the tag checks' disagreements (0 when every rank
    agreed) and the layer's non-finite statistics (NaN once any were). ``group`` LOCAL: no
    collective and no tag; ``checked=False``: no tag (the check is off).
    """

    FLAGS = ("shift", "forward", "backward", "nonfinite")

    def __init__(
        self, group: Group, payload: int, layer: int, like: Tensor, checked: bool, label: str
    ) -> None:
        self.group = group
        self.ranks = group_size(group)
        self.payload_size = payload
        self.label = label
        self.checked = checked and group is not LOCAL and self.ranks <= MAX_CHECKED_GROUP_SIZE
        self._like = like
        self._width = payload + 1 + (TAG_SIZE if self.checked else 0)
        self._codes = {
            phase: like.new_tensor(tag_code(layer, phase) if self.checked else [])
            for phase in PHASES
        }
        self._tails: dict[str, Tensor] = {}
        self._count = -1
        # One tensor per flag, not views of one: a compiled backward may mutate its own
        # flag only if the forward mutates no view of the same tensor.
        self.flags = [like.new_zeros(1) for _ in self.FLAGS]
        self._layer = layer

    def flag(self, name: str) -> Tensor:
        """The one-element flag named ``name`` (one of :attr:`FLAGS`)."""
        return self.flags[self.FLAGS.index(name)]

    def new_buffer(self) -> Tensor:
        """A buffer for one collective, ``[payload | count | tag]``: the layer writes its
        payload into the first ``payload_size`` values (with ``out=`` operations) and hands
        it to :meth:`all_reduce`. A new tensor each call, not a persistent one: compiled
        graphs may not mutate their inputs in backward."""
        return self._like.new_empty(self._width)

    def set_count(self, count: int) -> None:
        """This rank's number of values per statistic, sent behind the payload by the next
        collectives (a fill only when it changes; outside any traced function)."""
        if self._count != count:  # new tensors, not a fill: compiled graphs read them
            self._count = count
            self._tails = {
                phase: torch.cat((code.new_full((1,), count), code))
                for phase, code in self._codes.items()
            }

    def all_reduce(self, buffer: Tensor, phase: str, check: bool = True) -> Tensor:
        """Sum ``buffer`` (from :meth:`new_buffer`, its payload written) over the group, with
        the count and ``phase``'s tag written behind the payload first; the summed
        ``[payload | count]``, a view of the buffer. ``check=False`` leaves the flags alone
        (the tag is still sent, for the other ranks)."""
        buffer[self.payload_size :].copy_(self._tails[phase])
        if self.group is not LOCAL:
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        if self.checked and check:
            tag = buffer[-TAG_SIZE:]
            self.flag(phase).addmv_(tag[:TAG_BITS].view(1, TAG_BITS), tag[TAG_BITS:])
        return buffer[: self.payload_size + 1]

    def all_reduce_now(self, parts: Sequence[Tensor], phase: str, call: int | None) -> Tensor:
        """The concatenation of ``parts`` and a count slot (its last element is the count)
        summed over the group in one all-reduce of the layer's size, checked on the host
        at once: :class:`~distnorm.errors.SyncMismatchError` on every rank when the ranks
        were not all in this collective (under torch.compile, or while a CUDA graph is
        captured, the check goes to ``flags`` instead). Not for a steady step: it
        allocates and reads the host."""
        packed = torch.cat(list(parts))
        length = packed.numel()
        padding = self.payload_size + 1 - length
        code = self._codes[phase]
        buffer = torch.cat([packed[:-1], packed.new_zeros(padding), packed[-1:], code])
        if self.group is not LOCAL:
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        if self.checked:
            tag = buffer[-TAG_SIZE:]
            if torch.compiler.is_compiling() or _capturing(buffer):
                self.flag(phase).addmv_(tag[:TAG_BITS].view(1, TAG_BITS), tag[TAG_BITS:])
            elif _disagreement(tag.tolist()) != 0:
                raise SyncMismatchError(mismatch_message(self.label, phase, self.group, call))
        return torch.cat([buffer[: length - 1], buffer[self.payload_size : self.payload_size + 1]])


def _capturing(tensor: Tensor) -> bool:
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def mismatch_message(label: str, phase: str, group: Group, call: int | None) -> str:
    """What every rank of a group whose ranks met in different collectives says, naming
    the layer and collective it was in (``call``: the layer's training call, when known)."""
    which = f"the {phase} collective" + ("" if call is None else f" of training call {call}")
    return (
        f"{label}: rank {rank()} was in {which}, but the ranks of its sync group "
        f"({describe_group(group)}) were not all in the same one: some were in another "
        "synchronized layer, another call of this layer, or the other direction. Nothing "
        "was mixed: every rank raises this error, naming the layer it was in. Make every "
        "rank call the same synchronized layers, as many times, in the same order: the same "
        "control flow on every rank, no skipping a synchronized layer on some ranks (pass "
        "an empty batch through it instead), and, when ranks have different numbers of "
        "batches, distnorm.even_steps so that all take the same number of steps. "
        "check_sync=False turns this check off."
    )


# --- Groups in copies and pickles ------------------------------------------------------
#
# A ProcessGroup cannot be pickled or deep-copied, yet EMA and SWA copies (copy.deepcopy),
# torch.save of a whole model and spawn-based launchers copy converted layers. A layer's
# group leaves as a PortableGroup and comes back as the same group object in the process
# that made it; elsewhere it is joined again at the layer's next training call.

_portable_groups: dict[int, Any] = {}  # by id; held, so that an id is never reused


@dataclass(frozen=True)
class PortableGroup:
    """A layer's process group while the layer is copied or pickled: its member ranks in
    the default group, and how to find the group object again in the process that made
    it (``pid``, ``key``)."""

    ranks: tuple[int, ...]
    pid: int
    key: int


def portable(group: Group) -> Group | PortableGroup:
    """What a copy or pickle of a layer holds for its ``group``."""
    if group is None or group is LOCAL or isinstance(group, PortableGroup):
        return group
    _portable_groups[id(group)] = group
    ranks = tuple(dist.get_process_group_ranks(group)) if is_initialized() else ()
    return PortableGroup(ranks, os.getpid(), id(group))


def restored(group: Group | PortableGroup) -> Group | PortableGroup:
    """The group a copy or unpickled layer holds: the same object in the process that
    made it; elsewhere still portable, for :func:`joined` to resolve."""
    if isinstance(group, PortableGroup) and group.pid == os.getpid():
        return _portable_groups.get(group.key, group)
    return group


def sync_group_when_joined(group_size: int) -> Group | PortableGroup:
    """This rank's :func:`sync_group` of ``group_size`` ranks; before the process group
    exists (a model built before ``init_process_group``), a portable stand-in for it,
    joined at the layer's first training call, on every rank alike."""
    if is_initialized():
        return sync_group(group_size)
    start = world_layout().rank // group_size * group_size
    return PortableGroup(tuple(range(start, start + group_size)), pid=-1, key=0)


def joined(group: Group | PortableGroup, layer: str) -> Group:
    """``group`` as a live group, at a training call: a portable group from another
    process becomes this rank's sync group of its size (:func:`sync_group`, made on every
    rank if new, as the layers' first training calls are), when its ranks were one of
    those; else :class:`DistNormError` naming ``layer``."""
    group = restored(group)
    if not isinstance(group, PortableGroup):
        return group
    size = len(group.ranks)
    if (
        size
        and group.ranks == tuple(range(group.ranks[0], group.ranks[0] + size))
        and (group.ranks[0] % size == 0)
    ):
        return sync_group(size)
    raise DistNormError(
        f"{layer} was copied or unpickled from another process with a process group of "
        f"ranks {list(group.ranks)}, which is not a distnorm sync group; give it its group "
        "again (layer.process_group = torch.distributed.new_group(...), on every rank) "
        "before training it"
    )


def describe_group(group: Group | PortableGroup = None) -> str:
    """Short human description of ``group`` for reports: ``"world (4 ranks)"``; just
    ``"world"`` before the default group exists (the layer will use it once it does)."""
    if group is LOCAL:
        return "this rank only"
    if isinstance(group, PortableGroup):
        return f"{len(group.ranks)} ranks, joined at the next training call"
    if not is_initialized():
        return "world"
    size = group_size(group)
    if group is None or group is dist.group.WORLD:
        return f"world ({size} ranks)"
    return f"{size} of {dist.get_world_size()} ranks"


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


def __getattr__(name: str) -> Any:
    """``even_steps`` (and its helper) from :mod:`distnorm.uneven`, which imports this
    module and so is loaded on first use."""
    if name in ("even_steps", "_empty_like"):
        from distnorm import uneven

        return getattr(uneven, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
