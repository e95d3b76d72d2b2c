"""Gradient accumulation in real training loops, in one process: step boundaries (k training
calls, or an optimizer step after fewer), eval calls between micro-batches, Accelerate's
``accumulate()``, a checkpoint resumed mid-run, copies, torch.compile, bad arguments.

The layer comes first in each model, so its running statistics depend on the data only and
the reference is ``nn.BatchNorm2d`` stepped once per optimizer step on the step's batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import distnorm
from distnorm.errors import InputError

C, K = 3, 4


def micro_batches(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1 + i % 3, C, 4, 4, generator=generator, dtype=torch.float64) * 2 + 3
        for i in range(count)
    ]


def model(k: int = K) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(distnorm.SyncBatchNorm2d(C, accumulation_steps=k), nn.Conv2d(C, 2, 1))


def reference_stats(steps: list[list[torch.Tensor]]) -> nn.BatchNorm2d:
    """nn.BatchNorm2d after one training call per optimizer step, on the step's batch."""
    reference = nn.BatchNorm2d(C).double()
    for batches in steps:
        reference(torch.cat(batches))
    return reference


def assert_stats(layer: nn.Module, reference: nn.BatchNorm2d) -> None:
    torch.testing.assert_close(layer.running_mean, reference.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.running_var, reference.running_var, rtol=0, atol=1e-12)
    assert int(layer.num_batches_tracked) == int(reference.num_batches_tracked)


def train(net: nn.Module, batches: list[torch.Tensor], step_after: set[int]) -> list:
    """Forward and backward per micro-batch, an SGD step after the indices in
    ``step_after``; the outputs."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    outputs = []
    for i, x in enumerate(batches):
        y = net(x)
        y.square().sum().backward()
        outputs.append(y.detach())
        if i in step_after:
            optimizer.step()
            optimizer.zero_grad()
    return outputs


def test_an_optimizer_step_ends_a_partial_step() -> None:
    """6 micro-batches, steps after the 2nd and the 6th: the first step's statistics are
    its 2 micro-batches', the second's its 4."""
    net = model().double()
    batches = micro_batches(6)
    train(net, batches, step_after={1, 5})
    assert_stats(net[0], reference_stats([batches[:2], batches[2:]]))


def test_k_calls_end_a_step_without_an_optimizer() -> None:
    net = model().double()
    batches = micro_batches(8)
    with torch.no_grad():
        for x in batches:
            net(x)
    assert_stats(net[0], reference_stats([batches[:4], batches[4:]]))


def test_eval_calls_between_micro_batches_change_nothing() -> None:
    plain, interleaved = model().double(), model().double()
    batches = micro_batches(8)
    expected = train(plain, batches, step_after={3, 7})
    optimizer = torch.optim.SGD(interleaved.parameters(), lr=0.1)
    got = []
    for i, x in enumerate(batches):
        interleaved.train()
        y = interleaved(x)
        y.square().sum().backward()
        got.append(y.detach())
        interleaved.eval()
        with torch.no_grad():
            interleaved(micro_batches(1, seed=100 + i)[0])  # validation between micro-batches
        if i in (3, 7):
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_stats(interleaved[0], reference_stats([batches[:4], batches[4:]]))


def test_accelerate_accumulate_with_a_short_last_step() -> None:
    """Accelerate's ``accumulate()`` over 6 micro-batches with 4 per step: it steps the
    optimizer after the 4th and, at the end of the data, after the 6th."""
    accelerate = pytest.importorskip("accelerate")
    batches = micro_batches(6)
    data = torch.utils.data.DataLoader(batches, batch_size=None)  # one micro-batch per item
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=K)
    net = model().double()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    prepared, optimizer, data = accelerator.prepare(net, optimizer, data)
    steps = 0
    for x in data:
        with accelerator.accumulate(prepared):
            accelerator.backward(prepared(x).square().sum())
            optimizer.step()
            steps += accelerator.sync_gradients
            optimizer.zero_grad()
    assert steps == 2
    assert_stats(net[0], reference_stats([batches[:4], batches[4:]]))


def test_a_checkpoint_resumes_with_a_fresh_window() -> None:
    """The window is not in the state_dict (which keeps BatchNorm's keys): a model loaded
    from a checkpoint starts with an empty one. Its first step's micro-batches before the
    k-th normalize with fewer micro-batches; from the k-th on, outputs and running
    statistics are those of the uninterrupted run."""
    batches = micro_batches(12)
    uninterrupted = model().double()
    with torch.no_grad():
        expected = [uninterrupted(x) for x in batches]
        first = model().double()
        for x in batches[:4]:
            first(x)
        resumed = model().double()
        resumed.load_state_dict(copy.deepcopy(first.state_dict()))
        got = [resumed(x) for x in batches[4:]]
    assert set(first.state_dict()) == set(
        nn.Sequential(nn.BatchNorm2d(C), nn.Conv2d(C, 2, 1)).state_dict()
    )
    assert not torch.allclose(got[0], expected[4])  # the window restarted
    for a, b in zip(got[3:], expected[7:], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert_stats(resumed[0], reference_stats([batches[:4], batches[4:8], batches[8:]]))


def test_a_copy_accumulates_on_its_own() -> None:
    """A copy starts its own window; an optimizer step ends the partial steps of the
    layers whose parameters it updates, not those of another model."""
    original = model().double()
    batches = micro_batches(8)
    train(original, batches[:2], step_after=set())  # mid-step when copied
    duplicate = copy.deepcopy(original)
    assert duplicate[0].accumulation_steps == K
    train(duplicate, batches[2:5], step_after={2})  # a partial step of 3, in the copy
    assert_stats(duplicate[0], reference_stats([batches[2:5]]))
    assert int(original[0].num_batches_tracked) == 0  # still mid-step
    train(original, batches[5:7], step_after={1})  # its own step ends its 4
    assert_stats(original[0], reference_stats([batches[:2] + batches[5:7]]))


def test_compiled_model_accumulates_as_eager() -> None:
    eager, compiled = model(k=2).double(), model(k=2).double()
    batches = micro_batches(6)
    expected = train(eager, batches, step_after={1, 3, 5})
    got = train(torch.compile(compiled), batches, step_after={1, 3, 5})
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(compiled[0].running_mean, eager[0].running_mean)
    torch.testing.assert_close(compiled[0].running_var, eager[0].running_var)
    assert int(compiled[0].num_batches_tracked) == int(eager[0].num_batches_tracked) == 3


@pytest.mark.parametrize("steps", [0, -2, 2.0, True, "4"])
def test_bad_accumulation_steps_name_the_layer_and_the_fix(steps: object) -> None:
    with pytest.raises(InputError, match=r"SyncBatchNorm2d.*accumulation_steps=.*positive"):
        distnorm.SyncBatchNorm2d(C, accumulation_steps=steps)
