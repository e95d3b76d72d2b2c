"""distnorm.health in one process: the layers' outcomes wait on the device until a report
(the end of a backward pass, a repeated call, an optimizer step, distnorm.report()), which
reads them once and warns or raises; and a layer's state between calls is allocated once
and updated in place, as a captured CUDA graph needs. The two-rank behaviour (mismatches,
non-finite batches on every rank) is tested in test_reliability_mismatch.py and
test_reliability_nonfinite.py.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import distnorm
from distnorm.layers import BatchChannelNorm, BatchGroupNorm


def poisoned(rows: int = 4) -> torch.Tensor:
    x = torch.randn(rows, 8, 3, 3)
    x[0, 0, 0, 0] = float("nan")
    return x


def test_a_forward_only_step_is_reported_at_the_optimizer_step() -> None:
    """Micro-batch BCN guards its estimates even without peers; a step with no backward
    (here: none at all) is reported before the optimizer steps."""
    layer = BatchChannelNorm(8, num_groups=2, nonfinite="raise")
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.running_mean.clone()
    layer(poisoned())  # no error yet: the outcome is on the device
    assert torch.equal(layer.running_mean, before)
    with pytest.raises(distnorm.InputError, match="statistics are not finite"):
        optimizer.step()
    optimizer.step()  # reported once: the flags were zeroed when read


def test_report_reads_now_and_a_repeated_call_reports_before_it_runs() -> None:
    layer = BatchChannelNorm(8, num_groups=2, nonfinite="raise")
    layer(poisoned())
    with pytest.raises(distnorm.InputError):
        distnorm.report()
    distnorm.report()  # nothing left
    layer(poisoned())
    with pytest.raises(distnorm.InputError):
        layer(torch.randn(4, 8, 3, 3))  # the next call of the layer: the next step


def test_the_end_of_a_backward_pass_reports_and_warns_once() -> None:
    layer = BatchGroupNorm(8, 2, nonfinite="warn")
    x = poisoned().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x).sum().backward()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) <= 1  # once per process: an earlier test may have used it up
    expected = "BatchGroupNorm: a training batch's statistics are not finite"
    assert all(expected in message for message in messages)
    assert int(layer.num_batches_tracked) == 0


def test_state_between_calls_is_allocated_once_and_updated_in_place() -> None:
    """What a captured CUDA graph needs: the same tensors at every steady call."""
    layer = BatchGroupNorm(8, 2)

    def step() -> None:
        x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)
        layer(x.requires_grad_(True)).sum().backward()  # channels-last: the fused path

    def addresses() -> list[int]:
        state = layer._sync
        tensors = [state.shift, *state.flags, state.scratch, state.zeros]
        return [tensor.data_ptr() for tensor in tensors]

    step()
    first = addresses()
    shift = layer._sync.shift.clone()
    for _ in range(2):
        step()
    assert addresses() == first
    assert not torch.equal(layer._sync.shift, shift)  # updated, in place


def test_copies_and_pickles_leave_the_state_behind_and_report_for_themselves() -> None:
    """torch.save of a whole model and copy.deepcopy (EMA copies) of a trained layer: the
    copy holds the statistics, not the original's state between calls, and its own
    outcomes reach the report."""
    layer = BatchChannelNorm(8, num_groups=2, nonfinite="raise")
    layer(torch.randn(4, 8, 3, 3)).sum().backward()
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(layer)
    for twin in (loaded, copied):
        assert twin._sync is None and layer._sync is not None
        assert torch.equal(twin.running_mean, layer.running_mean)
        twin(poisoned())
        with pytest.raises(distnorm.InputError, match="statistics are not finite"):
            distnorm.report()
