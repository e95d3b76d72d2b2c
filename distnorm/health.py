"""Deferred reports: what synchronized layers find on the device, read by the host once a step.

Each training call of a synchronized layer learns two things only on the device: whether
every rank of its group was in the same collective (the tag check of
:class:`distnorm.comm.SyncChannel`) and whether the batch's statistics are finite. The layer
acts on both there (its statistics are gated by ``torch.where``) and accumulates them in its
flags. Reading them at every layer would make the host wait for the device at every layer,
a synchronization each on CUDA; this module reads every layer's flags at once (one
concatenation, one read) and raises or warns on the host. Reports happen, on every rank
alike (the flags come from summed values):

* at the end of each backward pass through a synchronized layer;
* before a layer's first training call, and before a collective of a direction the layer
  already made since the last report (a layer used twice, or steps without backward), so
  that ranks whose calls diverged stop before one waits for a collective no other joins;
* before ``optimizer.step()``, when calls were made since the last report or no report
  came since the previous step (compiled models, whose backward runs no Python), and when
  :func:`report` is called.

On CPU the read is immediate. On CUDA the flags go to pinned memory by a non-blocking copy,
read once the copy is done (polled at each synchronized call) and waited for at the first
synchronized call of the next step at the latest. Nothing is read under torch.compile or
while a CUDA graph is captured: the flags accumulate until a report outside.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from distnorm.errors import DistNormError


class Reporter:
    """What :class:`Monitor` needs of a layer: its flags (one-element tensors on one
    device) and ``act(values, calls)``, which raises or warns for the values they held;
    ``calls`` maps the collectives the layer made since the last report, in call order,
    to their training call (empty for calls made under torch.compile)."""

    flags: list[Tensor]

    def act(self, values: list[float], calls: dict[str, int]) -> None:  # pragma: no cover
        raise NotImplementedError


@dataclass
class _Pending:
    """One report on its way: the layers it covers with their calls, in the order of
    their first collective, and their flags' values once readable (``event``: the end of
    a CUDA copy into the pinned ``host``)."""

    reporters: list[tuple[Reporter, dict[str, int], int]]  # with their flags' offset
    host: Tensor
    event: torch.cuda.Event | None = None

    def ready(self) -> bool:
        return self.event is None or self.event.query()


class Monitor:
    """The process's report state: the layers to read, what each called since the last
    report (host bookkeeping, no device access), and reports in flight."""

    def __init__(self) -> None:
        self._owners: weakref.WeakSet[Any] = weakref.WeakSet()
        self._calls: dict[Reporter, dict[str, int]] = {}
        self._pending: list[_Pending] = []
        self._layout: list[tuple[torch.device, list[tuple[Reporter, int]], list]] = []
        self._layout_key: list[int] = []
        self._reports_since_step = 0
        self._backward_end_queued = False
        self._step_open = False

    def register(self, owner: Any) -> None:
        """Watch ``owner`` (a layer, registered when made, never inside a traced call),
        whose attribute ``_sync`` is its :class:`Reporter` once it has trained, or None."""
        self._owners.add(owner)

    def before_collective(self, reporter: Reporter, phase: str, call: int, first: bool) -> None:
        """Called by a layer before its collective of ``phase`` (``call``: its training
        call): reports first when the layer is new or already made this collective since
        the last report; otherwise acts on the reports whose copies are done."""
        if _tracing():
            return
        calls = self._calls.get(reporter, {})
        if first or phase in calls:
            self.report(wait=True)
            calls = {}
        else:
            self._deliver(wait=not self._step_open)  # wait at a step's first call only
        self._step_open = True
        calls[phase] = call
        self._calls[reporter] = calls

    def at_backward(self) -> None:
        """Called from a synchronized layer's backward: report once the pass has ended."""
        if _tracing() or self._backward_end_queued:
            return
        self._backward_end_queued = True
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)

    def _backward_ended(self) -> None:
        self._backward_end_queued = False
        self.report(wait=False)

    def at_optimizer_step(self) -> None:
        """Before ``optimizer.step()``: report the calls made since the last report, or,
        when there was no report since the previous step, any (compiled calls)."""
        if self._calls or self._reports_since_step == 0:
            self.report(wait=False)
        self._reports_since_step = 0

    def report(self, wait: bool = True) -> None:
        """Read every layer's flags (one concatenation and one read per device), zero them,
        and act; ``wait=False`` leaves a CUDA copy in flight, to be read when done."""
        if _tracing():
            return
        self._reports_since_step += 1
        self._step_open = False
        calls, self._calls = self._calls, {}
        for device, reporters, flags in self._flags_by_device():
            values = torch.cat(flags)
            # Layers in the order of their first collective since the last report, so that
            # the error raised is about the first mismatch; then those called when compiled.
            order = {reporter: index for index, reporter in enumerate(calls)}
            ordered = sorted(
                ((r, calls.get(r, {}), offset) for r, offset in reporters),
                key=lambda item: order.get(item[0], len(order)),
            )
            pending = _Pending(ordered, values)
            if device.type == "cuda":
                pending.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                pending.host.copy_(values, non_blocking=True)
                pending.event = torch.cuda.Event()
                pending.event.record()
            torch._foreach_zero_(flags)
            self._pending.append(pending)
        self._deliver(wait)

    def _flags_by_device(self) -> list[tuple[torch.device, list[tuple[Reporter, int]], list]]:
        """Per device, the layers with flags (each with the offset of its first flag) and
        all their flags in one list; made again only when a layer's state changed."""
        reporters = [owner._sync for owner in list(self._owners) if owner._sync is not None]
        key = [id(reporter) for reporter in reporters]
        if key != self._layout_key:
            by_device: dict[torch.device, tuple[list[tuple[Reporter, int]], list]] = {}
            for reporter in reporters:
                entries, flags = by_device.setdefault(reporter.flags[0].device, ([], []))
                entries.append((reporter, len(flags)))
                flags.extend(reporter.flags)
            self._layout = [(device, *value) for device, value in by_device.items()]
            self._layout_key = key
        return self._layout

    def _deliver(self, wait: bool) -> None:
        """Let the layers act on the reports whose values are readable (all of them when
        ``wait``), oldest first; the first error any layer raises is raised."""
        while self._pending and (wait or self._pending[0].ready()):
            pending = self._pending.pop(0)
            if pending.event is not None:
                pending.event.synchronize()
            values = pending.host.tolist()
            if not any(values) and all(value == value for value in values):
                continue  # nothing found: zeros, no NaN
            errors: list[DistNormError] = []
            for reporter, calls, offset in pending.reporters:
                try:
                    reporter.act(values[offset : offset + len(reporter.flags)], calls)
                except DistNormError as error:
                    errors.append(error)
            if errors:
                raise errors[0]


def _tracing() -> bool:
    return torch.compiler.is_compiling() or (
        torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    )


MONITOR = Monitor()


def report() -> None:
    """Read the synchronized layers' flags now and raise or warn for what they hold (a
    mismatch between ranks, non-finite statistics): what distnorm does by itself at the end
    of each backward pass and before each optimizer step. Call it after training calls that
    neither of those follow (forward passes only, a captured CUDA graph's replays)."""
    MONITOR.report(wait=True)


register_optimizer_step_pre_hook(lambda *_: MONITOR.at_optimizer_step())

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn with ``message`` the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
