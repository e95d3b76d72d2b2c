"""Statistics over an optimizer step's micro-batches, for gradient accumulation.

With gradient accumulation over k micro-batches the weights do not change within an
optimizer step, so the moments of the step's whole batch are the right statistics for each
of its micro-batches; but a micro-batch can only use those of the micro-batches already
seen. Micro-batch j of a step normalizes with the moments pooled over a window of the last
k micro-batches across its sync group: j of this step and k - j of the previous one, held
as constants, the reuse of recent statistics of Yan et al. 2020 (MABN, arXiv:2001.06838).
Per micro-batch the window keeps its mean, sum of squared deviations M2 and count, pooled
by Chan, Golub & LeVeque (1983), eq. 2.1::

    n = sum n_i,   mu = sum n_i mu_i / n,   M2 = sum M2_i + sum n_i (mu_i - mu)^2

The backward is BatchNorm's, ``dx = gamma invstd (g - mean(g) - xhat mean(g xhat))``, with
both means over the same window (MABN's averaged backward statistics, Sec. 4.1): each
micro-batch's sums as its own backward left them. The exact gradient of the windowed
forward averages the current micro-batch's sums only, over the window's count, which
leaves BatchNorm's gradient nearly uncentred; the accuracy study did not train with it.
At micro-batch k the window is exactly the step's batch, and running statistics are updated
once, from it, as ``nn.BatchNorm`` would from that batch. State lives on the device (slot
index included), updated in place; the host mirrors the phase only to skip the
optimizer-step check. Cost per micro-batch: no collective beyond the layer's own, and a
fixed number of operations on k x (2G + 1) values (``benchmarks/dispatch.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor


class StatisticsWindow:
    """The last ``steps`` micro-batches' statistics (``groups`` of them each) of one layer.

    ``rows[i] = [mean (G) | M2 (G) | count]`` of the micro-batch in slot i; micro-batch j
    of a step (from 0) is in slot j. ``phase`` (device) is the next micro-batch's slot;
    ``host_phase`` its mirror on the host (None while unknown: calls made under
    torch.compile).
    """

    def __init__(self, steps: int, groups: int, like: Tensor) -> None:
        self.steps, self.groups = steps, groups
        self.rows = like.new_zeros(steps, 2 * groups + 1)
        self.gradients = like.new_zeros(steps, 2 * groups)  # [sum(g) | sum(g xhat)] per slot
        self.phase = torch.zeros(1, dtype=torch.long, device=like.device)
        self.slots = torch.arange(steps, device=like.device)
        self.host_phase: int | None = 0

    def advance_host(self, compiling: bool) -> None:
        """Count a training call on the host (before its Function runs)."""
        if compiling or self.host_phase is None:
            self.host_phase = None
        else:
            self.host_phase = (self.host_phase + 1) % self.steps

    def pool(
        self, mean: Tensor, var: Tensor, count: Tensor, ok: Tensor, recomputing: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Replace the current micro-batch's ``mean`` and biased ``var`` (group sums over
        ``count`` values, in place) by the window's; return the window's count, whether
        running statistics may be updated now (``ok``, at a step's last micro-batch) and
        the call's slot (for :meth:`pooled_gradients`).

        A call the layer may use (``ok``) takes its slot; one that is not leaves it
        empty. A ``recomputing`` call (activation checkpointing) puts itself in the slot
        of the call it recomputes, in a copy: the window is left as it was."""
        current = torch.cat((mean, var * count, count.view(1)))
        if recomputing:
            slot = torch.remainder(self.phase + (self.steps - 1), self.steps)
            rows = self.rows.index_copy(0, slot, current.view(1, -1))
            update = torch.zeros_like(ok)
        else:
            slot, rows = self.phase.clone(), self.rows
            rows.index_copy_(0, self.phase, torch.where(ok, current, 0.0).view(1, -1))
            update = ok & self.phase.eq(self.steps - 1).view(())
            self.phase.add_(1).remainder_(self.steps)
        return _pooled(rows, self.groups, mean, var), update, slot

    def pooled_gradients(self, sums: Tensor, slot: Tensor, keep: bool = True) -> Tensor:
        """The window's ``[sum(g), sum(g xhat)]`` (2, G): this call's group ``sums`` in
        its ``slot``, the other micro-batches' as their backward passes left them (a
        micro-batch without one leaves those of the call k before it: only the backward
        writes them, which a compiled backward requires). ``keep=False``: left out of the
        window. MABN's averaged backward statistics (Yan et al., Sec. 4.1)."""
        rows = self.gradients.index_copy(0, slot, sums.reshape(1, -1))
        if keep:  # not when the window was made by the compiled graph calling this
            self.gradients.copy_(rows)
        return rows.sum(dim=0).view(2, self.groups)

    def finish(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """End a partial step (an optimizer step before k micro-batches): the statistics of
        this step's micro-batches (slots before ``phase``), whether there were any, and the
        phase back to 0. Returns ``(mean, var, count, ok)``."""
        mask = self.slots.lt(self.phase).to(self.rows.dtype).unsqueeze(1)
        mean = self.rows.new_empty(self.groups)
        var = self.rows.new_empty(self.groups)
        count = _pooled(self.rows * mask, self.groups, mean, var)
        ok = count.gt(1)
        self.phase.zero_()
        self.host_phase = 0
        return mean, var, count, ok


def _pooled(rows: Tensor, groups: int, mean: Tensor, var: Tensor) -> Tensor:
    """Chan's pooling of ``rows`` into ``mean`` and biased ``var`` (written in place);
    returns the pooled count."""
    means, m2, counts = rows[:, :groups], rows[:, groups : 2 * groups], rows[:, -1]
    total = counts.sum()
    divisor = total.clamp(min=1)
    torch.div(counts @ means, divisor, out=mean)
    spread = means.sub(mean).square_()
    torch.div(m2.sum(dim=0).addmv_(spread.t(), counts), divisor, out=var)
    return total
